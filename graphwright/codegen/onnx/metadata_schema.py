"""The schema of ``graphwright.json``: every field a loader reads, checked before any of it is used.

An artifact folder is untrusted input (it may come from anyone), so ``validate(meta, folder)``
checks types, ranges, cross-references and paths, and raises ``GraphwrightError`` naming the
field and what is allowed (``state[3].seq_dim: an integer in [0, 3]; got 7``). After it passes,
the loader's own reads (``spec_from_json``, ``OnnxStep.from_metadata``, ``run_records``, the
report) cannot fail with ``TypeError``/``KeyError``/``IndexError``/``ZeroDivisionError``.

What is checked: sizes (``num_layers`` <= ``MAX_LAYERS``, heads, dims and vocabulary bounded, so
no field makes the loader allocate without bound); names (the graph inputs are
``input_ids, positions, logits_index``, the state names, the extra inputs, in that order; every
state's next value is a graph output or a runtime op's result; runtime ops read only graph
outputs and inputs); paths (``model_file``, ``external_data``, ``tokenizer``, ``decode.model_file``,
``gemfilter.model_file``, ``kvzip.model_file`` and the keys of ``files`` are relative, without ``..``, and resolve inside
the artifact folder, symlinks followed). Whether the names match the ONNX graph itself is checked
when the session opens (``artifact._session``).

A small explicit validator rather than a schema library: pydantic and jsonschema are not
dependencies of graphwright, and several rules are cross-field (names against state, layers
against ``num_layers``) that a JSON Schema cannot state.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ...errors import GraphwrightError
from ...models.load import MAX_LAYERS

MAX_HEADS = 4096
MAX_DIM = 1 << 20  # head_dim, hidden_size, a state's static dims
MAX_VOCAB = 1 << 24
MAX_ID = (1 << 31) - 1  # token ids, positions, slot counts, budgets
MAX_NAMES = 64 * MAX_LAYERS  # state tensors, graph inputs/outputs
MAX_NAME_LEN = 256
STATE_KINDS = ("positions", "kv", "summary")
STATE_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
MODEL_DTYPES = ("float32", "float16", "bfloat16")
FIXED_INPUTS = ("input_ids", "positions", "logits_index")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Check:
    """Field checks that raise ``GraphwrightError('<file>: <field>: <allowed>; got <value>')``."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, allowed: str, got=None, show: bool = True):
        shown = f"; got {_show(got)}" if show else ""
        raise GraphwrightError(f"{self.where}: {field}: {allowed}{shown}")

    def dict(self, d, field: str, optional: bool = False):
        if d is None and optional:
            return None
        if not isinstance(d, dict):
            self.fail(field, "an object" + (" or null" if optional else ""), d)
        return d

    def list(self, v, field: str, max_len: int = MAX_NAMES):
        if not isinstance(v, list):
            self.fail(field, "a list", v)
        if len(v) > max_len:
            self.fail(field, f"a list of at most {max_len} items", f"{len(v)} items", show=True)
        return v

    def int(self, v, field: str, lo: int, hi: int, optional: bool = False):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.fail(field, f"an integer in [{lo}, {hi}]" + (" or null" if optional else ""), v)
        return v

    def number(self, v, field: str):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > MAX_ID:
            self.fail(field, f"a finite number of magnitude <= {MAX_ID}", v)
        return v

    def bool(self, v, field: str):
        if not isinstance(v, bool):
            self.fail(field, "true or false", v)
        return v

    def str(self, v, field: str, optional: bool = False, choices=None, max_len: int = MAX_NAME_LEN):
        if v is None and optional:
            return None
        if not isinstance(v, str) or len(v) > max_len or (choices is not None and v not in choices):
            allowed = f"one of {list(choices)}" if choices is not None else f"a string of at most {max_len} characters"
            self.fail(field, allowed + (" or null" if optional else ""), v)
        return v

    def names(self, v, field: str) -> list:
        names = [self.str(x, f"{field}[{i}]") for i, x in enumerate(self.list(v, field))]
        if len(set(names)) != len(names):
            self.fail(field, "distinct names", sorted({n for n in names if names.count(n) > 1}))
        return names

    def path(self, v, field: str, folder: Path, optional: bool = False):
        """A relative path that stays inside ``folder`` (no absolute path, no ``..``, symlinks resolved)."""
        if v is None and optional:
            return None
        allowed = "a relative path inside the artifact folder" + (" or null" if optional else "")
        if not isinstance(v, str) or not v or len(v) > 4096 or "\x00" in v:
            self.fail(field, allowed, v)
        p = Path(v)
        if p.is_absolute() or ".." in p.parts or v.startswith(("/", "\\")) or ":" in p.parts[0]:
            self.fail(field, allowed, v)
        root = folder.resolve()
        try:
            (root / p).resolve().relative_to(root)
        except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            self.fail(field, allowed + " (symlinks may not lead out of it)", v)
        return v


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def validate(meta: dict, folder) -> dict:
    """Check ``meta`` (a parsed ``graphwright.json`` of ``folder``) against the schema; returns it."""
    from .artifact import FORMAT, METADATA

    folder = Path(folder)
    c = _Check(str(folder / METADATA))
    c.dict(meta, "top level")
    if meta.get("format") != FORMAT:
        c.fail("format", f"{FORMAT!r} (a graphwright ONNX export)", meta.get("format"))
    from .export import FORMAT_VERSION

    c.int(meta.get("format_version"), "format_version", 1, FORMAT_VERSION)
    missing = [k for k in ("inputs", "outputs", "state", "model_info", "model_file") if k not in meta]
    if missing:
        c.fail("top level", f"incomplete metadata, missing {missing}; re-export the model", show=False)
    c.path(meta["model_file"], "model_file", folder)
    c.path(meta.get("external_data"), "external_data", folder, optional=True)
    c.path(meta.get("tokenizer"), "tokenizer", folder, optional=True)
    c.str(meta.get("recipe"), "recipe", optional=True, max_len=100_000)
    c.int(meta.get("prefill_chunk"), "prefill_chunk", 2, MAX_ID, optional=True)  # evict(block=N): prompt blocks
    info = _model_info(c, meta["model_info"])
    state = _state(c, meta["state"], info["num_layers"])
    extras = _extra_inputs(c, meta.get("extra_inputs"))
    inputs = c.names(meta["inputs"], "inputs")
    want = [*FIXED_INPUTS, *state, *extras]
    if inputs != want:
        c.fail("inputs", f"{FIXED_INPUTS} + the state names + the extra input names, in order ({_show(want)})", inputs)
    _outputs_and_ops(c, "", meta["outputs"], meta.get("runtime_ops"), state, inputs, needed=state)
    _decode(c, meta.get("decode"), state, inputs, folder)
    _prompt(c, meta.get("prompt"), state)
    _gemfilter(c, meta.get("gemfilter"), info["num_layers"], folder)
    _kvzip(c, meta.get("kvzip"), info, meta["state"], folder)
    _files(c, meta.get("files"), folder)
    _verification(c, meta.get("verification"))
    _report(c, meta.get("report"))
    for key in ("model", "export"):
        c.dict(meta.get(key), key, optional=True)
    c.list(meta.get("layers") or [], "layers", max_len=info["num_layers"])
    return meta


def _model_info(c: _Check, d) -> dict:
    d = c.dict(d, "model_info")
    f = "model_info."
    for key in ("architecture", "model_type"):
        c.str(d.get(key), f + key)
    layers = c.int(d.get("num_layers"), f + "num_layers", 1, MAX_LAYERS)
    heads = c.int(d.get("num_heads"), f + "num_heads", 1, MAX_HEADS)
    c.int(d.get("num_kv_heads"), f + "num_kv_heads", 1, heads)
    c.int(d.get("head_dim"), f + "head_dim", 1, MAX_DIM)
    c.int(d.get("hidden_size"), f + "hidden_size", 1, MAX_DIM)
    c.int(d.get("vocab_size"), f + "vocab_size", 1, MAX_VOCAB)
    c.str(d.get("dtype"), f + "dtype", choices=MODEL_DTYPES)
    eos = d.get("eos_token_id")
    for i, e in enumerate(c.list(eos if eos is not None else [], f + "eos_token_id", max_len=64)):
        c.int(e, f"{f}eos_token_id[{i}]", 0, MAX_ID)
    c.int(d.get("pad_token_id"), f + "pad_token_id", 0, MAX_ID, optional=True)
    c.int(d.get("max_positions"), f + "max_positions", 1, MAX_ID, optional=True)
    c.bool(d.get("is_moe", False), f + "is_moe")
    for key in ("attention_modules", "moe_modules"):
        for i, m in enumerate(c.list(d.get(key) or [], f + key, max_len=layers)):
            c.str(m, f"{f}{key}[{i}]")
    windows = c.list(d.get("windows") or [], f + "windows", max_len=layers)
    if windows and len(windows) != layers:
        c.fail(f + "windows", f"empty or one window per layer ({layers})", f"{len(windows)} items", show=True)
    for i, w in enumerate(windows):
        c.int(w, f"{f}windows[{i}]", 0, MAX_ID)
    return d


def _state(c: _Check, v, num_layers: int) -> list:
    names = []
    for i, s in enumerate(c.list(v, "state")):
        f = f"state[{i}]"
        s = c.dict(s, f)
        names.append(c.str(s.get("name"), f + ".name"))
        c.str(s.get("kind"), f + ".kind", choices=STATE_KINDS)
        c.str(s.get("dtype"), f + ".dtype", choices=STATE_DTYPES)
        shape = c.list(s.get("shape"), f + ".shape", max_len=8)
        if not shape:
            c.fail(f + ".shape", "a list of 1 to 8 dims", shape)
        for j, d in enumerate(shape):
            c.int(d, f"{f}.shape[{j}]", -1, MAX_DIM)
        c.int(s.get("seq_dim"), f + ".seq_dim", 0, len(shape) - 1)
        c.int(s.get("layer"), f + ".layer", 0, num_layers - 1, optional=True)
    if len(set(names)) != len(names):
        c.fail("state", "distinct state names", sorted({n for n in names if names.count(n) > 1}))
    return names


def _extra_inputs(c: _Check, v) -> list:
    from .export import EXTRA_EXAMPLES

    names = []
    for i, x in enumerate(c.list(v if v is not None else [], "extra_inputs", max_len=64)):
        f = f"extra_inputs[{i}]"
        x = c.dict(x, f)
        names.append(c.str(x.get("name"), f + ".name"))
        c.str(x.get("kind"), f + ".kind", choices=sorted(EXTRA_EXAMPLES))
        c.str(x.get("doc", ""), f + ".doc", max_len=10_000)
        c.dict(x.get("meta"), f + ".meta", optional=True)
    return names


def _outputs_and_ops(c: _Check, prefix: str, outputs, ops, state: list, inputs: list, needed: list) -> None:
    """Outputs are ``logits`` then names; every ``needed`` state's next value is an output or an op result."""
    outputs = c.names(outputs, prefix + "outputs")
    if not outputs or outputs[0] != "logits":
        c.fail(prefix + "outputs", "a list starting with 'logits'", outputs[:3])
    produced = {o[:-len("_next")] for o in outputs if o.endswith("_next")}
    produced |= _runtime_ops(c, prefix + "runtime_ops", ops, set(outputs), set(inputs), set(state))
    unproduced = [s for s in needed if s not in produced]
    if unproduced:
        c.fail(prefix + "outputs", "a '<name>_next' output (or a runtime op result) for every state tensor",
               f"none for {unproduced[:5]}", show=True)


def _runtime_ops(c: _Check, field: str, v, outputs: set, inputs: set, state: set) -> set:
    """Each record as ``split.py`` writes it; returns the state names the records produce."""
    from .split import VIEW_OPS, references

    known = sorted(references())
    produced = set()
    for i, rec in enumerate(c.list(v if v is not None else [], field)):
        f = f"{field}[{i}]"
        rec = c.dict(rec, f)
        c.str(rec.get("op"), f + ".op", choices=known)
        for j, a in enumerate(c.list(rec.get("args"), f + ".args", max_len=64)):
            _op_arg(c, f"{f}.args[{j}]", a, outputs, inputs)
        for j, r in enumerate(c.list(rec.get("results"), f + ".results", max_len=64)):
            if r is not None:
                produced.add(c.str(r, f"{f}.results[{j}]", choices=sorted(state)))
        results = len(rec["results"])
        for j, d in enumerate(c.list(rec.get("derived") or [], f + ".derived", max_len=64)):
            g = f"{f}.derived[{j}]"
            d = c.dict(d, g)
            c.int(d.get("from"), g + ".from", 0, max(results - 1, 0))
            produced.add(c.str(d.get("state"), g + ".state", choices=sorted(state)))
            for k, op in enumerate(c.list(d.get("ops"), g + ".ops", max_len=16)):
                op = c.list(op, f"{g}.ops[{k}]", max_len=2)
                if len(op) != 2:
                    c.fail(f"{g}.ops[{k}]", "[view op name, [integer args]]", op)
                c.str(op[0], f"{g}.ops[{k}][0]", choices=sorted(VIEW_OPS))
                for m, x in enumerate(c.list(op[1], f"{g}.ops[{k}][1]", max_len=8)):
                    c.int(x, f"{g}.ops[{k}][1][{m}]", -INT64, INT64 - 1, optional=True)  # slice ends: 2**62
    return produced


def _op_arg(c: _Check, f: str, a, outputs: set, inputs: set) -> None:
    a = c.dict(a, f)
    if len(a) != 1 or next(iter(a)) not in ("output", "input", "value", "result"):
        c.fail(f, "one of {'output': name}, {'input': name}, {'value': number}, {'result': [record, output]}", a)
    if "result" in a:  # an earlier runtime op's output
        pair = c.list(a["result"], f + ".result", max_len=2)
        if len(pair) != 2:
            c.fail(f + ".result", "[record index, output index]", pair)
        for x in pair:
            c.int(x, f + ".result", 0, 2**31 - 1)
    elif "output" in a:
        c.str(a["output"], f + ".output", choices=sorted(outputs))
    elif "input" in a:
        c.str(a["input"], f + ".input", choices=sorted(inputs))
    else:
        _literal(c, a["value"], f + ".value", nested=True)


INT64 = 2**63


def _literal(c: _Check, v, field: str, nested: bool = False) -> None:
    """A runtime op's literal argument as ``split.py`` writes it: null, a bool, a finite number within int64,
    a short string (a mode name such as 'avg' or 'mass'), or one flat list of those (token ids)."""
    if v is None or isinstance(v, bool):
        return
    if isinstance(v, str):
        c.str(v, field)
    elif isinstance(v, list) and nested:
        for i, x in enumerate(c.list(v, field, max_len=65536)):
            _literal(c, x, f"{field}[{i}]")
    elif isinstance(v, int) and -INT64 <= v < INT64:
        return
    elif not isinstance(v, float) or not math.isfinite(v):
        c.fail(field, "null, a bool, a finite number within int64, a short string, or a flat list of those", v)


def _decode(c: _Check, d, state: list, inputs: list, folder: Path) -> None:
    d = c.dict(d, "decode", optional=True)
    if d is None or d.get("model_file") is None:
        return
    c.path(d["model_file"], "decode.model_file", folder)
    _outputs_and_ops(c, "decode.", d.get("outputs"), d.get("runtime_ops"), state, inputs, needed=state)
    capacity = c.dict(d.get("capacity"), "decode.capacity")
    for name, cap in capacity.items():
        f = f"decode.capacity[{name!r}]"
        c.str(name, f, choices=state)
        cap = c.dict(cap, f)
        c.int(cap.get("slots"), f + ".slots", 1, MAX_ID)
        c.number(cap.get("fill"), f + ".fill")
        c.str(cap.get("grow"), f + ".grow", optional=True, choices=capacity)
    for i, r in enumerate(c.list(d.get("host_inputs") or [], "decode.host_inputs", MAX_LAYERS)):  # decode_policies.host_inputs
        f = f"decode.host_inputs[{i}]"
        r = c.dict(r, f)
        c.str(r.get("input"), f + ".input")
        c.str(r.get("kind"), f + ".kind", choices=["keyformer_gumbel"])
        c.int(r.get("seed"), f + ".seed", 0, MAX_ID)
        c.int(r.get("layer"), f + ".layer", 0, MAX_LAYERS)
        c.int(r.get("heads"), f + ".heads", 1, MAX_ID)
        c.str(r.get("key_positions"), f + ".key_positions", choices=state)
        c.str(r.get("meta"), f + ".meta", choices=state)
    if "shares_weights" in d:
        c.bool(d["shares_weights"], "decode.shares_weights")
    c.str(d.get("derived_from"), "decode.derived_from", optional=True, choices=["model.onnx"])  # decode_derive.py


def _prompt(c: _Check, d, state: list) -> None:
    """``prompt.capacity``: the states ``model.onnx`` evicts in the graph (``prompt_slots.py``), name -> slot
    bound, or null for a data-dependent width."""
    d = c.dict(d, "prompt", optional=True)
    if d is None:
        return
    for name, cap in c.dict(d.get("capacity") or {}, "prompt.capacity").items():
        c.str(name, f"prompt.capacity[{name!r}]", choices=state)
        c.int(cap, f"prompt.capacity[{name!r}]", 1, MAX_ID, optional=True)


def _gemfilter(c: _Check, d, num_layers: int, folder: Path) -> None:
    d = c.dict(d, "gemfilter", optional=True)
    if d is None:
        return
    c.path(d.get("model_file"), "gemfilter.model_file", folder)
    c.int(d.get("layer"), "gemfilter.layer", 0, num_layers - 1)
    c.int(d.get("keep"), "gemfilter.keep", 1, MAX_ID)
    c.int(d.get("kernel"), "gemfilter.kernel", 1, 1 << 16)


def _kvzip(c: _Check, d, info: dict, specs: list, folder: Path) -> None:
    """``kvzip``: the replay graph (``kvzip_export.py``) and what the host-side replay reads; each layer's positions
    state is [B, Hk, N] (``artifact.packed_growth`` reads its Hk)."""
    d = c.dict(d, "kvzip", optional=True)
    if d is None:
        return
    shapes = {s["name"]: s["shape"] for s in specs}
    state = sorted(shapes)
    c.path(d.get("model_file"), "kvzip.model_file", folder)
    layers = c.list(d.get("layers"), "kvzip.layers", max_len=info["num_layers"])
    if not layers:
        c.fail("kvzip.layers", "a non-empty list of [layer, k state, v state, positions state]", layers)
    for i, row in enumerate(layers):
        f = f"kvzip.layers[{i}]"
        row = c.list(row, f, max_len=4)
        if len(row) != 4:
            c.fail(f, "[layer, k state, v state, positions state]", row)
        c.int(row[0], f + "[0]", 0, info["num_layers"] - 1)
        for j in (1, 2, 3):
            c.str(row[j], f"{f}[{j}]", choices=state)
        if len(shapes[row[3]]) != 3 or not 1 <= shapes[row[3]][1] <= info["num_kv_heads"]:
            c.fail(f"{f}[3]", "a positions state of shape [-1, Hk, 0] (Hk the layer's KV heads)", shapes[row[3]])
    names = c.names(d.get("outputs"), "kvzip.outputs")
    if len(names) != 3 * len(layers):
        c.fail("kvzip.outputs", f"q, k, k_pos per layer ({3 * len(layers)} names)", f"{len(names)} names", show=True)
    scales = c.list(d.get("scales"), "kvzip.scales", max_len=len(layers))
    if len(scales) != len(layers):
        c.fail("kvzip.scales", f"one attention scale per layer ({len(layers)})", f"{len(scales)} items", show=True)
    for i, x in enumerate(scales):
        c.number(x, f"kvzip.scales[{i}]")
    s = c.dict(d.get("settings"), "kvzip.settings")
    c.number(s.get("budget"), "kvzip.settings.budget")
    c.int(s.get("budget_n"), "kvzip.settings.budget_n", 0, MAX_ID)
    c.number(s.get("budget_f"), "kvzip.settings.budget_f")
    if not 0 <= s["budget_f"] or (not s["budget_n"] and not s["budget_f"] > 0):
        c.fail("kvzip.settings", "a token budget budget_n >= 1 or a fraction budget_f > 0", s)
    c.bool(s.get("layerwise"), "kvzip.settings.layerwise")
    c.int(s.get("sinks"), "kvzip.settings.sinks", 0, MAX_ID)
    c.int(s.get("chunk"), "kvzip.settings.chunk", 1, MAX_ID)
    r = c.dict(d.get("replay"), "kvzip.replay")
    for key in ("first", "later", "suffix"):
        for i, t in enumerate(c.list(r.get(key), f"kvzip.replay.{key}", max_len=4096)):
            c.int(t, f"kvzip.replay.{key}[{i}]", 0, info["vocab_size"] - 1)
    c.int(r.get("prefix"), "kvzip.replay.prefix", 0, MAX_ID)
    c.str(r.get("source"), "kvzip.replay.source", optional=True)


def _files(c: _Check, d, folder: Path) -> None:
    if d is None:
        return
    d = c.dict(d, "files")
    if len(d) > MAX_NAMES:
        c.fail("files", f"at most {MAX_NAMES} entries", f"{len(d)} entries", show=True)
    for name, rec in d.items():
        f = f"files[{name!r}]"
        c.path(name, f, folder)
        rec = c.dict(rec, f)
        if not isinstance(rec.get("sha256"), str) or not SHA256.match(rec["sha256"]):
            c.fail(f + ".sha256", "64 lowercase hex digits", rec.get("sha256"))
        c.int(rec.get("bytes"), f + ".bytes", 0, 1 << 50)


def _verification(c: _Check, d) -> None:
    d = c.dict(d, "verification", optional=True)
    if d is not None and "passed" in d:
        c.bool(d["passed"], "verification.passed")
    if d is not None:
        c.str(d.get("error"), "verification.error", optional=True, max_len=100_000)


def _report(c: _Check, d) -> None:
    d = c.dict(d, "report", optional=True)
    if d is None:
        return
    c.dict(d.get("summary"), "report.summary", optional=True)
    for i, row in enumerate(c.list(d.get("rows") or [], "report.rows", max_len=MAX_LAYERS)):
        c.dict(row, f"report.rows[{i}]")
    for i, col in enumerate(c.list(d.get("columns") or [], "report.columns", max_len=256)):
        c.str(col, f"report.columns[{i}]")
    for key in ("verification", "last_stats"):
        c.dict(d.get(key), f"report.{key}", optional=True)


ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
             "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def check_state_inputs(session, state: list, model_path) -> None:
    """Each state spec against the graph input of that name: same rank, same dtype, and every static
    dim of the spec (not the batch -1 or the seq dim) equal to the graph's dim where that is fixed."""
    graph = {i.name: i for i in session.get_inputs()}
    for i, s in enumerate(state):
        g = graph.get(s["name"])
        if g is None:
            continue  # an input the exporter pruned (unused): nothing to compare
        field = f"{model_path}: graphwright.json state[{i}] ({s['name']})"
        if ORT_TYPES.get(g.type, g.type) != s["dtype"]:
            raise GraphwrightError(f"{field}: dtype {s['dtype']!r}, but the graph input is {g.type}")
        dims = list(g.shape)
        if len(dims) != len(s["shape"]) or any(isinstance(gd, int) and sd > 0 and j != s["seq_dim"] and gd != sd
                                                for j, (sd, gd) in enumerate(zip(s["shape"], dims))):
            raise GraphwrightError(f"{field}: shape {s['shape']} does not match the graph input's {dims}")
