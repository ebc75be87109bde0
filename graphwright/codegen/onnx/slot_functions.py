"""Per-layer in-graph eviction traced once, not once per layer: one opaque op per layer, one ONNX function per kind.

Used for the decode graph's slot eviction (below) and, the same way, for the prompt step's in-graph
eviction of ``model.onnx`` (``prompt_slots.h2o_prompt``, ``streaming_prompt``, ``snapkv_prompt``: the
fake kernel returns the kept width the per-layer trace had, ``min(S, c)`` for a constant bound or a
fresh unbacked size for a data-dependent one) and for latent layers (``decode_latent``), whose payload
width differs per layer: a fixed size in which layers sharing a key differ becomes a dynamic dim of
the key's own export (``_generalise``), so one function serves every rank. StreamingLLM layers whose keys
are cached at their positions (``streaming_shift.py``) add one more per-layer function to each graph:
``invert_slots`` (prompt graph, 1 output) and ``shifted_decode_attention`` (decode graph, 1 output).

``decode_slots.decode_graph`` puts a slot-eviction function (``h2o_decode``, ``streaming_decode``,
the latent ones, ``fastgen_decode``, ``rope_cache_index_decode``, and ``decode_policies.py``'s scored,
Keyformer and Scissorhands ones) in every layer of the decode graph. ``torch.export`` of that graph
traced all 30 copies of their ~100 ATen ops each with symbolic shapes (SmolLM2-135M: 4438 ATen nodes vs 2158 for the prefill graph; the decode graph's
``torch.export`` was 21-28 CPU s of an 84-99 CPU s export, README "Export time"), and the ONNX
exporter translated and optimised all 30 copies again.

Technique (the usual "export a repeated block once and call it" of ONNX local functions):

1. ``wrap(gm)``: each such call becomes ``graphwright_slots::step<n>(tensors, key)``, a custom op
   with ``n`` outputs whose ``key`` names the function and its constant arguments (budgets, scale,
   window...; layers with equal constants share a key). Its eager kernel runs the function; its
   fake kernel returns empty outputs of the shapes the function returns (``SHAPES``: the cache
   cut to its S slots), so ``torch.export`` records one node per layer and traces nothing inside.
2. The ONNX translation of ``step<n>`` is one node of the domain ``graphwright.slots`` whose op type
   is the key.
3. ``stitch(path, opset)`` after the decode graph is saved: each key's function is exported once
   (``torch.onnx.export`` of a module calling it on example tensors of the recorded dtypes/sizes,
   every symbolic dim dynamic, each dynamic dim's example the largest over the layers and >= 2:
   ``export_example``), turned into an ONNX ``FunctionProto`` of that domain and inlined into
   ``decode.onnx`` (``onnx.inliner.inline_local_functions``), so the saved graph has only standard
   ops, as before.

Fallback: any failure of this route for one graph (``torch.export`` with the opaque ops, a
function's export, stitching) makes ``export.py`` export that graph again layer by layer (the
route before this module, ``ENABLED = False``) and note why in ``graphwright.json["export"]["notes"]``
(``slot_functions`` / ``decode_slot_functions``); an export never fails because of this module.

Exact: the inlined nodes are the ONNX translation of the same torch function, so nothing is
approximated; the decode graph computes what the per-layer trace computed.

Invariant tested (``tests/onnx/test_slot_functions.py``): on tiny Llama with H2O (fraction and
token budgets), StreamingLLM, SnapKV and a latent H2O cache (``lowrank_kv``, ranks differing per
layer), the stitched ``model.onnx`` / ``decode.onnx`` have no ``graphwright.slots`` node left, pass
``onnx.checker``, and their tokens, logits and final state over a prompt step and 40 decode steps
(batch 2, left-padded) equal both graphs exported layer by layer (1e-5); the wrapped prompt and
decode graphs run eagerly equal the unwrapped ones.
"""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path

import torch

ENABLED = True  # False: the decode graph is traced layer by layer as before (A/B in bench/export_time.py, tests)
DOMAIN = "graphwright.slots"
LIBRARY = "graphwright_slots"
# The functions wrapped (n outputs). The latent ones (``decode_latent``: ``lowrank_kv`` gives each layer its
# own rank, so the payload width differs per layer) share one function whose payload width is dynamic
# (``_generalise``).
OUTPUTS = {"h2o_decode": 4, "streaming_decode": 3, "fastgen_decode": 6, "rope_cache_index_decode": 2,
           "h2o_latent_decode": 4, "streaming_latent_decode": 3,
           "scored_decode": 3, "scored_acc_decode": 4, "keyformer_decode": 5, "scissorhands_decode": 6,
           # the prompt step's in-graph eviction (``prompt_slots.py``, ``model.onnx``)
           "h2o_prompt": 4, "streaming_prompt": 3, "snapkv_prompt": 3,
           # StreamingLLM layers with keys cached at their positions (``streaming_shift.py``): the prompt step's
           # inversion of every cached key, the decode step's attention
           "invert_slots": 1, "shifted_decode_attention": 1,
           # decode_rows.py: the H2O layer's attention + eviction on (old slots, new row), StreamingLLM's eviction
           "h2o_attend_rows": 5, "streaming_rows": 3, "slot_attention": 1, "streaming_attend_rows": 4,
           "streaming_attend_slots": 4,
           "back_rotation": 1, "sink_keys": 1, "sink_rotation": 1, "sink_keys_at": 1, "rows_at": 3}

# key -> {"fn", "params" (signature names), "template" [("t", i) | ("c", value)], "example" [(dtype, sizes, dynamic dims)]}
KEYS: dict = {}
_NUMBERS = itertools.count()  # key suffixes: unique in the process (a forgotten key's name is never reused)


def _functions() -> dict:
    from . import decode_latent, decode_policies, decode_rows, decode_slots, prompt_slots, streaming_shift

    modules = (decode_slots, decode_latent, decode_policies, prompt_slots, streaming_shift, decode_rows)
    return {name: next(getattr(m, name) for m in modules if hasattr(m, name)) for name in OUTPUTS}


def _call(key: str, tensors) -> tuple:
    """The key's function on ``tensors`` (its constants filled in); its outputs as a tuple (one-output functions too)."""
    entry = KEYS[key]
    args = [tensors[v] if kind == "t" else v for kind, v in entry["template"]]
    out = entry["fn"](*args)
    return (out,) if OUTPUTS[entry["name"]] == 1 else tuple(out)


def _single(key: str, out: tuple):
    """What ``step<n>`` returns: the tuple, or its one tensor for a one-output function (schema ``-> Tensor``)."""
    return out[0] if OUTPUTS[KEYS[key]["name"]] == 1 else out


def _kernel(tensors, key):
    # a custom op's outputs may not alias its inputs (FastGen passes a slice of its policy state through)
    return _single(key, tuple(o.clone() for o in _call(key, tensors)))


# Output shapes per function: (argument it is shaped like, how): "slots" = that argument with dim 2 cut to
# S = k_pos.shape[2] - 1 (what ``place``/``union_place`` return), "same" = its shape, an int n = its last dim n
# (per-head state: FastGen's policy, Keyformer's meta, Scissorhands' step), "rot" = [B, 1, D, D] of q [B, H, 1, D]
# (a rotation matrix per row), "width" = dim 2 set to the prompt
# step's kept width (``_width``), ("last", arg) = its shape with the last dim of ``arg`` (attention: q's shape, v's width).
_KV = [("k", "slots"), ("v", "slots"), ("k_pos", "slots")]
_W = [("k", "width"), ("v", "width"), ("k_pos", "width")]
SHAPES = {"h2o_decode": [*_KV, ("k_pos", "slots")],
          "streaming_decode": _KV,
          "fastgen_decode": [*_KV, ("k_pos", "slots"), ("k_pos", "slots"), ("policy", 1)],
          "rope_cache_index_decode": [("q", "same"), ("k", "same")],
          "h2o_latent_decode": [*_KV, ("k_pos", "slots")],
          "streaming_latent_decode": _KV,
          "scored_decode": _KV,
          "scored_acc_decode": [*_KV, ("k_pos", "slots")],
          "keyformer_decode": [*_KV, ("k_pos", "slots"), ("meta", 3)],
          "scissorhands_decode": [*_KV, ("bits", "slots"), ("k_pos", "slots"), ("step", 1)],
          "h2o_prompt": [*_W, ("k_pos", "width")],
          "streaming_prompt": _W,
          "snapkv_prompt": _W,
          "invert_slots": [("k", "same")],
          "shifted_decode_attention": [("q", ("last", "v"))],
          "h2o_attend_rows": [("q", ("last", "v_old")), ("k_old", "same"), ("v_old", "same"), ("kp_old", "same"), ("score", "same")],
          "streaming_rows": [("k_old", "same"), ("v_old", "same"), ("kp_old", "same")],
          "streaming_attend_rows": [("q", ("last", "v_old")), ("k_old", "same"), ("v_old", "same"), ("kp_old", "same")],
          "streaming_attend_slots": [("q", ("last", "v_old")), ("k_old", "same"), ("v_old", "same"), ("kp_old", "same")],
          "back_rotation": [("q", "rot")],
          "sink_keys": [("k_old", "same")],
          "sink_rotation": [("q", "rot")],
          "sink_keys_at": [("k_old", "same")],
          "rows_at": [("k_old", "same"), ("v_old", "same"), ("kp_old", "same")],
          "slot_attention": [("q", ("last", "v"))]}
# Output dtypes of the prompt functions (None: the dtype of the argument it is shaped like). Not from a run on
# meta tensors as for the decode ones: ``kept_width`` reads a value (``.item()``).
DTYPES = {"h2o_prompt": [None, None, None, torch.float32], "streaming_prompt": [None] * 3, "snapkv_prompt": [None] * 3}


def _bound(name: str, const: dict):
    """The constant slot bound c of a prompt function (its width is min(S, c)), or None: data dependent
    (``prompt_slots.kept_width``, an unbacked size here as in the traced function)."""
    if name == "streaming_prompt":
        return int(const["sinks"]) + int(const["window"])
    if name == "h2o_prompt" and not (const["heavy_f"] or const["recent_f"]):
        return int(const["heavy_n"]) + int(const["recent_n"])
    return None


def _width(name: str, const: dict, S):
    """The kept width of a prompt function's outputs, as ``prompt_slots`` computes it under ``torch.export``."""
    c = _bound(name, const)
    if c is not None:
        return torch.sym_min(S, c)
    w = torch.library.get_ctx().new_dynamic_size()
    torch._check(w <= S)
    return w


class SlotSignatureError(RuntimeError):
    """Two layers given one key differ in dtype or rank, or a function's example has a dynamic dim below 2
    (``export.py`` then traces the graph layer by layer)."""


def _static(example) -> list:
    return [(str(dtype), [None if i in dims else n for i, n in enumerate(sizes)]) for dtype, sizes, dims in example]


def _generalise(key: str, have: list, new: list) -> list:
    """One ONNX function per key: a fixed size in which layers sharing the key differ (a latent layer's payload
    width 2r, ``lowrank_kv`` ranks per layer; duo's streaming / retrieval head count per layer) becomes a dynamic
    dim of the function's own export. Dtypes and ranks must agree (``SlotSignatureError`` otherwise:
    ``export.py`` then traces layer by layer).

    The example kept is the largest size per dim over the layers: ``torch.export`` specialises a dynamic dim
    whose example is 0 or 1 (duo: one streaming head in one layer, two in another), and a size relation that
    holds in every layer (k and v with the same head count, k_pos one slot longer) holds for the maxima too
    when it is increasing."""
    if len(have) != len(new) or any(a[0] != b[0] or len(a[1]) != len(b[1]) for a, b in zip(have, new)):
        raise SlotSignatureError(f"slot function {key}: layers sharing it differ in dtype or rank "
                                 f"({_static(new)} vs {_static(have)})")
    return [(dtype, [max(x, y) for x, y in zip(sizes, s2)],
             sorted(set(dims) | set(d2) | {i for i, (x, y) in enumerate(zip(sizes, s2)) if x != y}))
            for (dtype, sizes, dims), (_, s2, d2) in zip(have, new)]


def export_example(key: str, example: list) -> tuple:
    """The example tensors and ``dynamic_shapes`` of a key's own ``torch.export``. A dynamic dim must be >= 2 in
    the example (export specialises 0 and 1, then refuses the dim as dynamic): ``SlotSignatureError`` naming it."""
    small = [(j, d, sizes[d]) for j, (_, sizes, dims) in enumerate(example) for d in dims if sizes[d] < 2]
    if small:
        raise SlotSignatureError(f"slot function {key}: dynamic dim(s) with an example size below 2 "
                                 f"(tensor, dim, size: {small}); torch.export would specialise them")
    args = tuple(torch.zeros(sizes, dtype=dtype) for dtype, sizes, _ in example)
    dyn = tuple({d: torch.export.Dim.DYNAMIC for d in dims} or None for _, _, dims in example)
    return args, dyn


def wrappable(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` calls one of the functions ``wrap`` replaces."""
    fns = set(_functions().values())
    return any(n.op == "call_function" and n.target in fns for n in gm.graph.nodes)


def _fake(tensors, key):
    """Empty outputs of the shapes ``SHAPES`` gives and the dtypes a run on meta tensors of the traced sizes gives.

    Not the function itself on fake tensors: it uses sizes as values (``full_like(first, S)``), which a fake
    kernel can only do by specialising the size to its example value."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    entry = KEYS[key]
    sizes = [[optimization_hint(d, fallback=2) for d in t.shape] for t in tensors]
    example = [(t.dtype, n, [i for i, d in enumerate(t.shape) if isinstance(d, torch.SymInt)]) for t, n in zip(tensors, sizes)]
    if entry.get("example") is None:  # the sizes torch.export traced with: the function's own example inputs
        entry["example"] = example
    elif _static(example) != _static(entry["example"]):
        entry["example"] = _generalise(key, entry["example"], example)
    if entry.get("dtypes") is None and entry["name"] in DTYPES:
        entry["dtypes"] = [d or tensors[dict(zip(entry["params"], entry["template"]))[arg][1]].dtype
                           for d, (arg, _) in zip(DTYPES[entry["name"]], SHAPES[entry["name"]])]
    if entry.get("dtypes") is None:
        with unset_fake_temporarily():
            meta = [torch.empty(n, dtype=t.dtype, device="meta") for t, n in zip(tensors, sizes)]
            entry["dtypes"] = [o.dtype for o in _call(key, meta)]
    by_name = dict(zip(entry["params"], [tensors[v] if kind == "t" else None for kind, v in entry["template"]]))
    S = by_name["k_pos"].shape[2] - 1 if "k_pos" in by_name else None
    if any(how == "width" for _, how in SHAPES[entry["name"]]):
        const = {p: v for p, (kind, v) in zip(entry["params"], entry["template"]) if kind == "c"}
        width = _width(entry["name"], const, by_name["k_pos"].shape[2])
    out = []
    for (name, how), dtype in zip(SHAPES[entry["name"]], entry["dtypes"]):
        shape = list(by_name[name].shape)
        if how == "slots":
            shape[2] = S
        elif how == "width":
            shape[2] = width
        elif isinstance(how, int):
            shape[-1] = how
        elif how == "rot":  # decode_rows.back_rotation: [B, 1, D, D] of q [B, H, 1, D]
            shape = [shape[0], 1, shape[-1], shape[-1]]
        elif isinstance(how, tuple):
            shape[-1] = by_name[how[1]].shape[-1]
        out.append(by_name[name].new_empty(shape, dtype=dtype))
    return _single(key, tuple(out))


_LIB = None


def _ops() -> dict:
    """{n outputs: the ``graphwright_slots::step<n>`` overload}, defined on first use."""
    global _LIB
    counts = sorted(set(OUTPUTS.values()))
    if _LIB is None:
        _LIB = torch.library.Library(LIBRARY, "DEF")
        for n in counts:
            _LIB.define(f"step{n}(Tensor[] tensors, str key) -> " + ("Tensor" if n == 1 else f"({', '.join(['Tensor'] * n)})"))
            _LIB.impl(f"step{n}", _kernel, "CompositeExplicitAutograd")
            torch.library.register_fake(f"{LIBRARY}::step{n}", _fake, lib=_LIB)
    return {n: getattr(torch.ops.graphwright_slots, f"step{n}").default for n in counts}


def _constant_id(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), tuple(v.shape), v.detach().cpu().numpy().tobytes())
    return (type(v).__name__, repr(v))


def wrap(gm: torch.fx.GraphModule) -> list:
    """Replace every slot-eviction function call of ``gm`` (in place) by its ``step<n>`` op; returns the keys used.

    A call with an argument that is neither a graph node, None nor a constant (a list of nodes) stays as it is."""
    fns, ops = _functions(), _ops()
    by_fn = {fn: name for name, fn in fns.items()}
    seen, used = {}, []
    for node in list(gm.graph.nodes):
        name = by_fn.get(node.target) if node.op == "call_function" else None
        if name is None:
            continue
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        tensors, template, const = [], [], []
        for pname, v in bound.arguments.items():
            if isinstance(v, torch.fx.Node):
                template.append(("t", len(tensors)))
                tensors.append(v)
                const.append((pname, "t"))
            elif isinstance(v, (list, tuple, dict)) and any(isinstance(x, torch.fx.Node) for x in (v.values() if isinstance(v, dict) else v)):
                break
            else:
                template.append(("c", v))
                const.append((pname, _constant_id(v)))
        else:
            sig = (name, tuple(const))
            if sig not in seen:
                seen[sig] = f"{name}_{next(_NUMBERS)}"
                KEYS[seen[sig]] = {"fn": node.target, "name": name, "params": [c[0] for c in const], "template": template,
                                   "example": None, "dtypes": None}
            key = seen[sig]
            node.target, node.args, node.kwargs = ops[OUTPUTS[name]], (tensors, key), {}
            if key not in used:
                used.append(key)
    gm.graph.lint()
    gm.recompile()
    return used


def translations() -> dict:
    """Translation table entries: ``step<n>`` -> one ``graphwright.slots::<key>`` node with n outputs."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    domain = Opset(DOMAIN, 1)
    types = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "double", "int64", "int32", "bool")]

    def make(n):
        def step(tensors, key: str):
            schema = OpSchema(key, DOMAIN, 1,
                              inputs=[OpSchema.FormalParameter(f"x{i}", f"T{i}") for i in range(len(tensors))],
                              outputs=[OpSchema.FormalParameter(f"y{i}", f"U{i}") for i in range(n)],
                              type_constraints=[(f"T{i}", types, "") for i in range(len(tensors))]
                              + [(f"U{i}", types, "") for i in range(n)])
            return Op(domain, key, schema)(*tensors)

        return step

    return {op: make(n) for n, op in _ops().items()}


class _Call(torch.nn.Module):
    def __init__(self, key):
        super().__init__()
        self.key = key

    def forward(self, *tensors):
        return tuple(_call(self.key, tensors))


def function_proto(key: str, opset: int):
    """The ONNX ``FunctionProto`` (domain ``graphwright.slots``, name ``key``) of one key's function, and the
    functions it calls: its own ``torch.onnx.export`` on the sizes recorded by the fake kernel."""
    from onnx import helper

    from .exporter_shortcuts import shortcuts
    from .optimize import optimize

    entry = KEYS[key]
    if entry["example"] is None:
        raise RuntimeError(f"slot function {key} was never traced (no example sizes recorded)")
    args, dyn = export_example(key, entry["example"])
    ep = torch.export.export(_Call(key), args, dynamic_shapes=(dyn,), strict=False)
    with shortcuts({}):  # exporter_shortcuts.py: no decomposition retrace of a clean program, the registry built once
        program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, optimize=False, verbose=False,
                                    input_names=[f"x{i}" for i in range(len(args))])
    optimize(program)
    m = program.model_proto
    g = m.graph
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]  # no weights: small constants
    nodes += list(g.node)
    fp = helper.make_function(DOMAIN, key, [i.name for i in g.input], [o.name for o in g.output], nodes,
                              opset_imports=list(m.opset_import))
    return fp, list(m.functions)


def forget(keys) -> None:
    for key in keys:
        KEYS.pop(key, None)


def stitch(path: Path, keys: list, opset: int, model=None) -> int:
    """Inline each key's ONNX function into the saved graph ``path`` (weights stay where they are); returns the
    number of ``graphwright.slots`` nodes replaced. Raises when one is left. The keys are forgotten afterwards.
    ``model``: the graph to stitch (a ModelProto, modified) instead of the one saved at ``path``, which is written."""
    try:
        return _stitch(path, keys, opset, model)
    finally:
        forget(keys)


def _stitch(path: Path, keys: list, opset: int, model=None) -> int:
    import onnx
    from onnx import inliner

    m = onnx.load(str(path), load_external_data=False) if model is None else model
    count = sum(n.domain == DOMAIN for n in m.graph.node)
    have = {(f.domain, f.name) for f in m.functions}
    for key in keys:
        fp, inner = function_proto(key, opset)
        m.functions.append(fp)
        for f in inner:
            if (f.domain, f.name) not in have:
                m.functions.append(f)
                have.add((f.domain, f.name))
    for imp in {(i.domain, i.version) for f in m.functions for i in f.opset_import} - {(i.domain, i.version) for i in m.opset_import}:
        if imp[0] not in {i.domain for i in m.opset_import}:
            m.opset_import.append(onnx.helper.make_opsetid(*imp))
    m = inliner.inline_local_functions(m)
    left = [n.op_type for n in m.graph.node if n.domain == DOMAIN]
    if left:
        raise RuntimeError(f"slot functions not inlined into {path.name}: {sorted(set(left))}")
    keep = [i for i in m.opset_import if i.domain != DOMAIN]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    onnx.save(m, str(path))
    return count


def _register() -> None:
    from .translations import TRANSLATIONS

    TRANSLATIONS.update(translations())


_register()  # translations.translation_table() imports every module of this package
