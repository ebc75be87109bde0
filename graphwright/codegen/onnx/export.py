"""``graphwright.export_onnx(cm, out_dir)``: the rewritten step graph as an ONNX artifact.

Route: ``torch.export`` of ``cm.graph`` (which still holds graphwright's custom op nodes) with
every dynamic dim read from the state specs, then ``torch.onnx.export`` of that program with
the translation table of ``translations.py`` standing in for the custom ops. The artifact is
the same step function as the torch module, so one runtime loop drives both.

Layout of ``out_dir``: ``model.onnx`` (+ ``model.onnx.data`` external weights),
``graphwright.json`` (what a loader needs besides the graph: state specs, model info, report,
verification, the sha256 of every file written: ``manifest.py``) and ``tokenizer/`` when the
compiled model has one.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from ...capture.step_graph import positions_from_mask, prompt_blocks, spec_bytes_per_token
from ...errors import GraphwrightError
from ...ops.eviction import EVICT_SNAPKV
from ...version import __version__
from .artifact import FORMAT, METADATA, MODEL, OnnxStep, info_to_json, spec_to_json
from .export_probe import MAX_PROBE, probe, probe_lengths
from .exporter_shortcuts import LAST as decompose_state
from .exporter_shortcuts import shortcuts
from .manifest import record_files, save_tokenizer
from .optimize import optimize
from .phases import Phases
from .reference_threads import small_steps
from .trace_meta import no_tensor_meta

EXTERNAL_DATA = MODEL + ".data"
DECODE_MODEL = "decode.onnx"  # single-token steps with in-graph slot eviction (decode_slots.py)
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 2  # 2: "files" (content hashes, manifest.py)
# Max |logit| difference allowed between the artifact and the torch module on the probe.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}

INPUTS = ("input_ids", "positions", "logits_index")
# Example shape of an extra input per kind (batch first): steer weights are [B, P] float32, P prompt positions.
EXTRA_EXAMPLES = {"steer": ((7,), torch.float32)}


def io_names(specs, extras=()) -> tuple[list, list]:
    """Graph input and output names: state tensors keep their spec name in, ``<name>_next`` out;
    extra inputs (steering weights) follow the state under their own names."""
    return ([*INPUTS, *(s.name for s in specs), *(x.name for x in extras)],
            ["logits", *(f"{s.name}_next" for s in specs)])


def check_extras(extras) -> None:
    unknown = [x.name for x in extras if x.kind not in EXTRA_EXAMPLES]
    if unknown:
        raise GraphwrightError(f"extra graph input(s) {unknown} have no ONNX export rule; known kinds: {sorted(EXTRA_EXAMPLES)}")


def extra_examples(extras, batch: int = 2) -> list:
    return [torch.zeros(batch, *EXTRA_EXAMPLES[x.kind][0], dtype=EXTRA_EXAMPLES[x.kind][1]) for x in extras]


def example_inputs(specs, batch: int = 2, seq: int = 3, cache: int = 5):
    """Tracing inputs: a step of ``seq`` new tokens after ``cache`` cached ones.

    Sizes are distinct and > 1 so export does not specialise a dynamic dim to 0/1 or tie two
    unrelated dims together; positions are consistent (cache slots 0..cache-1, then the tokens).
    """
    ids = torch.zeros(batch, seq, dtype=torch.long)
    pos = torch.arange(cache, cache + seq).expand(batch, seq).contiguous()
    logits_index = torch.arange(seq - 2, seq) if seq > 1 else torch.zeros(1, dtype=torch.long)
    state = []
    for spec in specs:
        shape = [batch if d == -1 else d for d in spec.shape]
        shape[spec.seq_dim] = cache
        if spec.kind == "positions":
            t = torch.arange(cache).expand(*shape).contiguous().to(spec.dtype) if spec.seq_dim == len(shape) - 1 \
                else torch.zeros(shape, dtype=spec.dtype)
        else:
            t = torch.zeros(shape, dtype=spec.dtype)
        state.append(t)
    return (ids, pos, logits_index, *state)


def dynamic_shapes(specs):
    """One named ``batch`` dim shared by every input's batch axis; the new-token, logits-index and
    every spec's seq dim dynamic with relations inferred by export (``Dim.DYNAMIC``), so per-layer
    cache lengths or latent layouts need no code here.

    A named ``batch`` (instead of one ``Dim.DYNAMIC`` per tensor that export proves equal) makes
    export raise instead of silently specialising the batch size. It does not change export time
    (SmolLM2-135M ``torch.export``: 15.2 vs 15.5 CPU s; README, "Export time")."""
    dyn, batch = torch.export.Dim.DYNAMIC, _batch_dim()
    per_spec = []
    for spec in specs:
        dims = {i: batch for i, d in enumerate(spec.shape) if d == -1}
        dims[spec.seq_dim] = dyn
        per_spec.append(dims)
    return ({0: batch, 1: dyn}, {0: batch, 1: dyn}, {0: dyn}, *per_spec)


def _batch_dim():
    return torch.export.Dim("batch")


def extra_dynamic_shapes(extras) -> list:
    """Batch and dynamic dims of the extra inputs; None stands for a decode host input [B, Hk, g, S+1] (S dynamic)."""
    dyn, batch = torch.export.Dim.DYNAMIC, _batch_dim()
    return [{0: batch, 3: dyn} if x is None else {0: batch, **{i: dyn for i in range(1, 1 + len(EXTRA_EXAMPLES[x.kind][0]))}}
            for x in extras]


def host_input_examples(records, sg, args) -> list:
    """Examples of the decode graph's host inputs (``decode_policies.host_inputs`` records, Keyformer's noise):
    zeros [B, Hk, g, S+1] sized from the example of the layer's key-position state."""
    names = [s.name for s in sg.state]
    out = []
    for r in records:
        B, Hk, S = args[3 + names.index(r["key_positions"])].shape
        out.append(torch.zeros(B, Hk, sg.info.num_heads // Hk, S + 1))
    return out


def _graph_files() -> list:
    from .gemfilter_export import SELECT_DATA, SELECT_MODEL
    from .kvzip_export import REPLAY_DATA, REPLAY_MODEL

    return [MODEL, EXTERNAL_DATA, SELECT_MODEL, SELECT_DATA, DECODE_MODEL, DECODE_MODEL + ".data", REPLAY_MODEL, REPLAY_DATA]


def _prepare_dir(out: Path, overwrite: bool, tokenizer=None) -> list:
    """Refuse to write into a non-empty folder that is not a previous export unless ``overwrite``;
    returns the files of the previous export (``manifest.owned_files``), which are removed.

    Only files a previous export recorded in its ``graphwright.json`` are removed or replaced, never
    anything else in the folder: a file with a name the export needs that graphwright did not write
    (a user's ``tokenizer/tokenizer.json``, a foreign ``model.onnx``) is an error, with or without
    ``overwrite``, before anything is written.
    """
    from .manifest import check_no_foreign, owned_files, tokenizer_files

    if out.exists() and not out.is_dir():
        raise GraphwrightError(f"{out}: exists and is not a directory")
    owned = owned_files(out) if out.is_dir() else None
    if out.is_dir() and any(out.iterdir()) and owned is None and not overwrite:
        raise GraphwrightError(f"{out}: directory is not empty and is not a graphwright export; "
                               "choose an empty or new directory, or pass overwrite=True")
    planned = [*_graph_files(), METADATA]
    if tokenizer is not None:
        planned += [f"{TOKENIZER_DIR}/{n}" for n in tokenizer_files(tokenizer)]
    check_no_foreign(out, planned, owned)
    out.mkdir(parents=True, exist_ok=True)
    for name in owned or ():
        if (out / name).is_file() or (out / name).is_symlink():
            (out / name).unlink()
    return owned or []


def _to_onnx(cm, path: Path, opset: int, external_data: bool, phases: Phases, gm=None, tag: str = "", share_with=None,
             prompt: dict | None = None) -> tuple:
    """Export the step graph (minus the ops left to the runtime, ``split.py``); returns the ONNX
    output names, the runtime-op records and whether the weights were saved shared. Each step is
    timed in ``phases``.

    ``gm``: the decode graph of ``decode_slots.decode_graph`` instead of the step graph: exported
    for single-token steps (``input_ids`` [B, 1], ``logits_index`` [1]); ``tag`` prefixes the phase names.
    ``share_with``: a saved graph whose external data file this one's weights point into
    (``shared_weights.save_sharing``; its weights are then never written twice).
    ``prompt``: a dict filled with ``prompt_slots.prompt_graph``'s record when the step graph's eviction
    ops with a prompt-step translation run in the graph (the others are split)."""
    sg = cm.step_graph
    decode = gm is not None
    gm, records, outputs, inputs, host = _split_graph(sg, gm, phases, tag, prompt)
    return _export_split(sg, gm, records, outputs, inputs, host, decode, path, opset, external_data, phases, tag, share_with,
                         prompt)


def _split_graph(sg, gm, phases: Phases, tag: str = "", prompt: dict | None = None) -> tuple:
    """The graph ``_export_split`` exports: the step graph (StreamingLLM's key layout, in-graph prompt eviction) or the
    decode graph ``gm``, cut at the ops left to the runtime (``split.py``); returns ``(gm, records, outputs, inputs,
    host)``. Reads node metadata (``meta["val"]``), so it runs where the graph was built (``decode_process.py``)."""
    from .split import split

    extras = list(sg.extra_inputs)
    check_extras(extras)
    inputs, outputs = io_names(sg.state, extras)
    decode = gm is not None
    host = list(gm.meta.get("host_inputs") or ()) if decode else []  # decode_policies.host_inputs: after the extras
    inputs = [*inputs, *(r["input"] for r in host)]
    with phases(tag + "split"):
        if not decode:  # streaming_shift.py: StreamingLLM keys cached at their absolute rotation (decode.onnx too)
            from .streaming_shift import shift_streaming

            gm, _ = shift_streaming(sg.gm, decode=False)
        if not decode and prompt is not None:  # prompt_slots.py: in-graph eviction at the prompt step
            from .prompt_slots import prompt_graph

            gm, record = prompt_graph(gm, sg.state)
            prompt.update(record)
        gm, records, outputs = split(gm, inputs, [s.name for s in sg.state])
        if not decode and prompt and not records and not prompt["split"] and \
                {r["op"] for r in prompt["in_graph"]} == {EVICT_SNAPKV.name()}:  # decode.onnx derives from these
            from .prompt_slots import append_outputs

            prompt["appends"] = append_outputs(gm, outputs)
    return gm, records, outputs, inputs, host


def _export_split(sg, gm, records, outputs, inputs, host, decode: bool, path: Path, opset: int, external_data: bool,
                  phases: Phases, tag: str = "", share_with=None, prompt: dict | None = None, before_save=None) -> tuple:
    """``_split_graph``'s graph through ``torch.export``, translation, optimizer, save and stitch (``_export_graph``),
    with the layer-by-layer fallback of ``slot_functions.py``; returns ``(outputs, records, shared)``. Uses only
    ``sg.state``, ``sg.extra_inputs`` and ``sg.info`` and no node metadata, so the decode graph's chain can run in a
    second process (``decode_process.py``). ``before_save``: called (and timed) before the graph is written."""
    from . import slot_functions
    from .translations import graphwright_ops, translation_table  # onnxscript: imported only when exporting

    extras = list(sg.extra_inputs)
    keys, plain = [], gm
    if slot_functions.ENABLED:  # slot_functions.py: one opaque op per layer's eviction (decode slots, prompt_slots
        # at a prompt step), its ONNX function exported once per kind and stitched in after saving
        with phases(tag + "wrap"):
            if slot_functions.wrappable(gm):
                plain = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
                keys = slot_functions.wrap(gm)
    table = translation_table()
    missing = sorted(str(op) for op in graphwright_ops(gm) if op not in table)
    if missing:
        raise GraphwrightError(f"no ONNX translation for {', '.join(missing)}: add one with "
                               "@register(op) in a module of graphwright/codegen/onnx/")
    args = (*example_inputs(sg.state, seq=1 if decode else 3), *extra_examples(extras))
    dyn = list(dynamic_shapes(sg.state))
    if decode:  # one new token: input_ids/positions [B, 1], logits_index [1]
        dyn[0], dyn[1], dyn[2] = {0: dyn[0][0]}, {0: dyn[1][0]}, None
        args = (*args, *host_input_examples(host, sg, args))  # Keyformer's noise [B, Hk, g, S+1]
        extras = [*extras, *(None for _ in host)]
    dyn = (*dyn, *extra_dynamic_shapes(extras))
    graph = (args, dyn, inputs, outputs, table)
    failed = None
    keep = None  # decode_swap.py: the un-stitched model.onnx, for decode.onnx of an H2O recipe
    if keys and not decode and prompt is not None and not records and not prompt.get("split"):
        from .decode_swap import wanted

        keep = prompt if wanted(keys) else None
    if keys:
        try:
            shared = _export_graph(gm, graph, path, opset, external_data, phases, tag, share_with, keys, keep, before_save)
        except Exception as exc:  # noqa: BLE001 - any failure of the stitched route (torch.export with the opaque
            # ops, translation, a function's export, stitching): the graph is traced layer by layer, the route
            # before slot_functions.py; a failure there is a real error and is raised. Noted in graphwright.json.
            failed = f"layer by layer ({type(exc).__name__}: {str(exc).strip()[:400]})"
        finally:
            slot_functions.forget(keys)
    if failed is not None:  # outside the except block: the failed attempt's program is no longer referenced
        phases.note(tag + "slot_functions", failed)
        if prompt is not None:
            prompt.pop("unstitched", None)
        gm = plain
    if not keys or failed is not None:
        shared = _export_graph(gm, graph, path, opset, external_data, phases, tag, share_with, [], None, before_save)
    return outputs, records, shared


def _export_graph(gm, graph: tuple, path: Path, opset: int, external_data: bool, phases: Phases, tag: str, share_with,
                  keys: list, keep: dict | None = None, before_save=None) -> bool:
    """``torch.export`` of ``gm``, ONNX translation, optimizer, save (and stitch of ``keys``) at ``path``;
    True when the weights point into ``share_with``'s file. Errors are ``GraphwrightError``s naming the step.
    ``keep``: a dict that gets the un-stitched graph and its keys' entries under ``"unstitched"`` (``decode_swap.py``).
    ``before_save``: called before saving (``decode_process.py``: waits until ``share_with`` is written); returns
    the ``share_with`` to use."""
    args, dyn, inputs, outputs, table = graph
    with phases(tag + "torch_export"):
        try:
            with no_tensor_meta():  # trace_meta.py: no per-node tensor_meta (symbolic is_contiguous checks)
                ep = torch.export.export(gm, args, dynamic_shapes=dyn, strict=False)
        except Exception as exc:  # noqa: BLE001 - re-raised with what failed
            raise GraphwrightError(f"torch.export of the step graph failed: {type(exc).__name__}: {str(exc).strip()[:500]}") from exc

    def translate():
        return torch.onnx.export(ep, (), dynamo=True, custom_translation_table=table, opset_version=opset,
                                 input_names=inputs, output_names=outputs, optimize=False, verbose=False)

    with phases(tag + "onnx_translate"):
        try:
            with shortcuts(table):  # exporter_shortcuts.py: no retrace of a clean program
                program = translate()
            phases.note(tag + "decompositions", "skipped" if decompose_state.get("skipped") else decompose_state.get("blocking"))
        except Exception as first:  # noqa: BLE001 - the exporter's own full path is the fallback (tiny GPT-2's
            # Conv1D graph fails with the shortcuts: a head count left symbolic); only its failure is an error
            try:
                program = translate()
            except Exception as exc:  # noqa: BLE001
                raise GraphwrightError(f"ONNX translation failed: {type(exc).__name__}: {str(exc).strip()[:500]}") from exc
            phases.note(tag + "decompositions", f"full exporter path (shortcuts failed: {type(first).__name__})")
    with phases(tag + "onnx_optimize"):
        ran = optimize(program)  # optimize.py: the exporter's pipeline minus its one quadratic rewrite rule
    if "rule_filter" in ran:  # rule_filter.py: the rewrite rules guarded by their root op type (same bytes)
        phases.note(tag + "rule_filter", "on" if ran["rule_filter"] else "off")
    if before_save is not None:
        with phases(tag + "wait_model"):
            share_with = before_save()
    return _save(program, path, opset, external_data, phases, tag, share_with, keys, keep)


def _save(program, path: Path, opset: int, external_data: bool, phases: Phases, tag: str, share_with, keys, keep=None) -> bool:
    """Save ``program`` at ``path`` (weights shared with ``share_with`` when given) and stitch the slot-eviction
    functions of ``keys`` into it (``slot_functions.py``); True when the weights point into ``share_with``'s file."""
    with phases(tag + "save"):
        shared = False
        if share_with is not None:  # shared_weights.py: the weights point into the first graph's data file
            from .shared_weights import save_sharing

            shared = save_sharing(program, path, share_with)
        if not shared:
            program.save(str(path), external_data=external_data)
    if keys:
        from .slot_functions import stitch

        if keep is not None:
            import onnx

            from .decode_swap import keep as entries

            with phases(tag + "keep_unstitched"):
                keep["unstitched"] = (onnx.load(str(path), load_external_data=False), entries(keys))
        with phases(tag + "stitch"):
            try:
                stitch(path, keys, opset)
            except Exception as exc:  # noqa: BLE001 - re-raised with what failed
                raise GraphwrightError(f"{path.name}: stitching the slot-eviction functions failed: "
                                       f"{type(exc).__name__}: {str(exc).strip()[:500]}") from exc
    return shared


def _decode_plan(sg) -> tuple:
    """``(gm, capacity, in_graph, left, shift_layers)``: the decode graph of ``decode_slots.decode_graph`` on the
    step graph with StreamingLLM's key layout (``streaming_shift.py``, as ``model.onnx``'s)."""
    from .decode_slots import decode_graph
    from .streaming_shift import shift_streaming

    shifted, shift_layers = shift_streaming(sg.gm, decode=True)  # the same key layout as model.onnx's (_to_onnx)
    return (*decode_graph(shifted, sg.state), shift_layers)


def _exported_long_way(plan: tuple) -> bool:
    """Whether ``plan``'s decode graph can only be exported by its own ``torch.export`` chain: eviction in the graph,
    and neither ``decode_derive`` (appends only) nor ``decode_swap`` (partner swaps, if the prompt step runs every
    eviction op in the graph) may apply. When this says False the long way may still be taken (a derivation that fails)."""
    from .decode_derive import appends_only
    from .decode_swap import ENABLED as SWAP
    from .decode_swap import swappable

    gm, capacity, in_graph, left, _ = plan
    if not in_graph or appends_only(gm, capacity, in_graph, left):
        return False
    return not (SWAP and swappable(gm, capacity, in_graph, left, {"in_graph": [{"op": op} for op in in_graph], "split": []}))


def _start_decode_job(cm, plan: tuple, out: Path, opset: int, external_data: bool, phases: Phases):
    """``decode_process.DecodeJob`` exporting ``plan``'s decode graph in a child process, or None (not wanted, or it
    could not start: noted under ``decode_process``; the decode graph is then exported here as before)."""
    from . import decode_process

    sg = cm.step_graph
    if not decode_process.wanted(sg) or not _exported_long_way(plan):
        return None
    with phases("decode_start"):
        try:
            gm, records, outputs, inputs, host = _split_graph(sg, plan[0], Phases(), "decode_")
            share = out / MODEL if external_data else None
            job = decode_process.DecodeJob.start(sg, gm, (records, outputs, inputs, host), out / DECODE_MODEL, opset,
                                                 external_data, share)
        except Exception as exc:  # noqa: BLE001 - the decode graph is exported in this process instead (noted)
            phases.note("decode_process", f"not started ({type(exc).__name__}: {str(exc).strip()[:300]}); exported here")
            return None
    job.started_at, job.out = time.perf_counter(), out
    return job


def _decode_result(job, phases: Phases):
    """The child's ``(outputs, records, shared)`` with its phases merged into ``phases``, or None when it failed
    (noted; the caller exports the decode graph itself)."""
    with phases("decode_wait"):
        try:
            res = job.result()
        except Exception as exc:  # noqa: BLE001 - any failure of the child: the serial route decides (and raises)
            phases.note("decode_process", f"failed ({type(exc).__name__}: {str(exc).strip()[:400]}); exported here")
            for name in (DECODE_MODEL, DECODE_MODEL + ".data"):  # whatever the child wrote before failing
                (job.out / name).unlink(missing_ok=True)
            return None
    rec = res["phases"]
    phases.merge(rec, cpu=rec.get("startup_cpu_s", 0.0))
    phases.note("decode_process", f"decode.onnx exported by a child process (ready {rec['ready_at'] - job.started_at:.1f} s "
                                  f"after its start, {rec.get('startup_cpu_s', 0.0):.1f} CPU s of imports)")
    return res["outputs"], res["records"], res["shared"]


def _decode_onnx(cm, out: Path, opset: int, external_data: bool, phases: Phases, prefill=None, appends=None,
                 prompt: dict | None = None, unstitched=None, plan: tuple | None = None, job=None):
    """``decode.onnx`` when some eviction op runs in the graph at decode (``decode_slots.py``).

    Returns the ``graphwright.json["decode"]`` record: model file, outputs, the runtime ops left
    (split at decode too), the capacity states (name -> slots, pad value), the in-graph ops and
    ``split``: why each other eviction op stays split at decode. No decode graph: ``model_file``
    None with the reasons, or None for a recipe without eviction.
    With external data, ``decode.onnx`` points at ``model.onnx.data`` (``shared_weights.py``).
    ``prefill``: ``(outputs, records)`` of ``model.onnx``; when the decode graph only appends (SnapKV),
    ``decode.onnx`` is ``model.onnx`` with renamed outputs (``decode_derive.py``), not a second export.
    ``appends``: ``{"<state>_next": "<state>_append"}`` of ``prompt_slots.append_outputs`` (in-graph
    SnapKV at the prompt step); ``model.onnx`` loses those outputs here whether or not it is derived.
    ``prompt``, ``unstitched``: ``model.onnx``'s prompt record and its un-stitched graph with its slot keys' entries:
    when the decode graph only swaps the prompt step's slot functions for their decode partners (H2O),
    ``decode.onnx`` is that graph with the decode functions stitched in (``decode_swap.py``), not a second export.
    ``plan``: ``_decode_plan``'s result (computed here when None); ``job``: the ``decode_process.DecodeJob``
    exporting the decode graph meanwhile (``_start_decode_job``), used when the long way is taken."""
    from .decode_derive import appends_only, derive_append_decode, derive_from_appends, strip_outputs

    sg = cm.step_graph
    gm, capacity, in_graph, left, shift_layers = plan if plan is not None else _decode_plan(sg)
    if not in_graph:
        if appends:
            strip_outputs(out / MODEL, set(appends.values()))
        return {"model_file": None, "split": left} if left else None
    derived = False
    wanted = io_names(sg.state, sg.extra_inputs)[1]
    if prefill is not None and appends_only(gm, capacity, in_graph, left):
        with phases("decode_derive"):
            if appends:  # in-graph SnapKV at the prompt step: decode.onnx reads its appended cache
                derived = derive_from_appends(out, MODEL, DECODE_MODEL, appends, wanted)
            else:
                derived = derive_append_decode(out, MODEL, DECODE_MODEL, prefill[0], prefill[1], wanted)
    if not derived and unstitched is not None and prefill is not None and not prefill[1] \
            and list(prefill[0]) == wanted:
        from .decode_swap import derive_swapped, swappable

        if swappable(gm, capacity, in_graph, left, prompt or {}):
            with phases("decode_swap"):
                try:
                    swap = derive_swapped(out, unstitched[0], unstitched[1], DECODE_MODEL, opset)
                    derived = True
                    phases.note("decode_derive", "slot functions swapped: " + ", ".join(sorted(set(swap.values()))))
                except Exception as exc:  # noqa: BLE001 - the decode graph is exported the long way instead (noted)
                    phases.note("decode_swap", f"exported ({type(exc).__name__}: {str(exc).strip()[:400]})")
    if appends and not derived:
        strip_outputs(out / MODEL, set(appends.values()))
    if derived:
        outputs, records, shared = wanted, [], external_data and (out / EXTERNAL_DATA).exists()
    else:
        main = out / MODEL if external_data and (out / EXTERNAL_DATA).exists() else None
        done = _decode_result(job, phases) if job is not None else None
        if done is not None:  # decode_process.py: exported by the child meanwhile
            outputs, records, shared = done
        else:
            outputs, records, shared = _to_onnx(cm, out / DECODE_MODEL, opset, external_data, phases, gm=gm, tag="decode_",
                                                share_with=main)
        if main is not None and not shared:
            from .shared_weights import share_weights

            with phases("decode_share_weights"):
                shared = share_weights(out, MODEL, DECODE_MODEL)
    with phases("decode_check"):
        try:
            import onnx

            onnx.checker.check_model(str(out / DECODE_MODEL), full_check=True)
        except Exception as exc:  # noqa: BLE001
            raise GraphwrightError(f"{out / DECODE_MODEL}: onnx.checker rejected the decode graph: {str(exc).strip()[:500]}") from exc
    host = [{**r, "heads": sg.info.num_heads} for r in gm.meta.get("host_inputs") or ()]
    return {"model_file": DECODE_MODEL, "outputs": outputs, "runtime_ops": records, "capacity": capacity, "in_graph": in_graph,
            **({"host_inputs": host} if host else {}),
            "split": left, "shares_weights": shared, "derived_from": MODEL if derived else None,
            "streaming_shift": shift_layers}


def probe_extras(extras, mask) -> dict:
    """Non-trivial extra inputs for the probe, so the verification exercises their path: steering
    weights of 1 (one log(alpha)) on every other prompt position."""
    out = {}
    for x in extras:
        if x.kind == "steer":
            B, T = mask.shape
            out[x.name] = (torch.arange(T) % 2).float().expand(B, T).contiguous()
    return out


@torch.inference_mode()
def torch_reference(cm, decode_steps: int = 3, max_probe_tokens: int = MAX_PROBE) -> dict:
    """The torch side of ``verify_artifact``: the probe (``export_probe.py``) run through the torch runtime's step,
    prefill then ``decode_steps`` greedy steps; each step's inputs and logits. It does not need the artifact, so
    ``export_onnx`` computes it while a child process still exports ``decode.onnx`` (``decode_process.py``)."""
    sg = cm.step_graph
    torch_step = cm._step  # the lowered module the torch runtime runs
    lengths, reach = probe_lengths(sg, cm.recipe, max_probe_tokens)
    ids, mask = probe(sg.info.vocab_size, lengths)
    B, T = ids.shape
    pos = positions_from_mask(mask)
    st_t = cm.runtime_graph.init_state(B)  # what the torch step runs (sliding layers bounded: its own state layout)
    extras = probe_extras(sg.extra_inputs, mask)
    step_in = (ids, pos, torch.arange(T))
    chunk = sg.notes.get("prefill_chunk")  # evict(block=N): the prompt runs as blocks of N, as the runtime runs it
    steps = []
    for step in range(decode_steps + 1):
        with small_steps(B * (min(T, chunk) if step == 0 and chunk else step_in[0].shape[1])):  # reference_threads.py
            if step == 0 and chunk and T > chunk:
                lt, st_t = _prompt_in_blocks(torch_step, ids, pos, chunk, st_t, extras)
            else:
                lt, st_t = torch_step(*step_in, st_t, **extras)
        steps.append((step_in, lt))
        nxt = lt[:, -1].argmax(-1, keepdim=True)
        step_in = (nxt, step_in[1][:, -1:] + 1, torch.zeros(1, dtype=torch.long))
    return {"steps": steps, "mask": mask, "extras": extras, "chunk": chunk, "reach": reach, "decode_steps": decode_steps,
            "max_probe_tokens": max_probe_tokens}


@torch.inference_mode()
def verify_artifact(cm, onnx_step, decode_steps: int = 3, max_probe_tokens: int = MAX_PROBE, reference: dict | None = None) -> dict:
    """Run the artifact and the torch step graph side by side: prefill (all positions) then
    ``decode_steps`` greedy decode steps on the torch tokens; each keeps its own state. The prompt
    crosses the model's and the recipe's largest window / budget up to ``max_probe_tokens``
    (``export_probe.py``). Raises ``GraphwrightError`` naming the step when max |dlogit| exceeds
    the dtype's tolerance. ``reference``: ``torch_reference``'s result for the same arguments (computed here
    when None); the artifact's steps are fed the same inputs either way."""
    sg = cm.step_graph
    tol = TOLERANCE.get(sg.info.dtype, 1e-3)
    ref = reference if reference is not None else torch_reference(cm, decode_steps, max_probe_tokens)
    if (ref["decode_steps"], ref["max_probe_tokens"]) != (decode_steps, max_probe_tokens):
        raise ValueError(f"reference computed for {ref['decode_steps']} decode steps / {ref['max_probe_tokens']} tokens, "
                         f"not {decode_steps} / {max_probe_tokens}")
    mask, extras, chunk = ref["mask"], ref["extras"], ref["chunk"]
    B, T = mask.shape
    st_o = sg.init_state(B)
    diffs = []
    real = mask.bool()
    for step, (step_in, lt) in enumerate(ref["steps"]):
        if step == 0 and chunk and T > chunk:
            lo, st_o = _prompt_in_blocks(onnx_step, step_in[0], step_in[1], chunk, st_o, extras)
        else:
            lo, st_o = onnx_step(*step_in, st_o, **extras)
        if lo.shape != lt.shape:
            raise GraphwrightError(f"ONNX verification failed at {'prefill' if step == 0 else f'decode step {step}'}: "
                                   f"logits shape {list(lo.shape)} != torch {list(lt.shape)}")
        d = (lo.float() - lt.float())
        d = d[real] if step == 0 else d
        diff = float(d.abs().max())
        name = "prefill" if step == 0 else f"decode step {step}"
        diffs.append({"step": name, "max_abs_logit_diff": diff})
        if not diff <= tol:  # also catches NaN
            raise GraphwrightError(f"ONNX verification failed at {name}: max |logit difference| {diff:.3g} > {tol:g} "
                                   f"(batch {B}, left-padded, {sg.info.dtype})")
    return {"passed": True, "tolerance": tol, "max_abs_logit_diff": max(d["max_abs_logit_diff"] for d in diffs),
            "steps": diffs, "probe": {"batch": B, "prompt_lengths": [int(x) for x in mask.sum(1)], "decode_steps": decode_steps,
                                      **ref["reach"]}}


def _prompt_in_blocks(step, ids, pos, chunk: int, state, extras):
    """The prompt as ``prompt_blocks`` steps (logits at every position of each block), state threaded."""
    if extras:
        raise GraphwrightError(f"extra inputs {sorted(extras)} cannot be fed to a prompt run in blocks (prefill_chunk={chunk})")
    out = []
    for a, b in prompt_blocks(ids.shape[1], chunk):
        logits, state = step(ids[:, a:b], pos[:, a:b], torch.arange(b - a), state)
        out.append(logits)
    return torch.cat(out, dim=1), state


def _layers(sg) -> list:
    """Per-layer cache layout: the state tensors each layer owns, bytes per token, attention variant."""
    variants = {}
    for node in sg.gm.graph.nodes:
        meta = node.meta.get("graphwright") or {}
        if meta.get("layer") is not None and meta.get("op"):
            variants.setdefault(meta["layer"], {})[meta["op"]] = meta.get("variant")
    rows = []
    for layer in range(sg.info.num_layers):
        specs = [s for s in sg.state if s.layer == layer]
        rows.append({"layer": layer, "state": [s.name for s in specs],
                     "kv_bytes_per_token": sum(spec_bytes_per_token(s) for s in specs if s.kind == "kv"),
                     "variants": variants.get(layer, {})})
    return rows


def session_runs(records: list, prompt: dict, decode: dict | None) -> dict:
    """``graphwright.json["session_runs"]``: per step kind, whether it is one session run and, if not,
    which ops stay split and why (``prompt_slots.py``, ``decode_slots.py``)."""
    out = {"prompt": {"one_session_run": not records, "in_graph": prompt.get("in_graph", []), "split": prompt.get("split", [])}}
    if decode and decode.get("model_file"):
        out["decode"] = {"one_session_run": not decode.get("runtime_ops"), "in_graph": decode.get("in_graph", []),
                         "split": decode.get("split", [])}
    else:  # decode steps run model.onnx as well
        out["decode"] = {**out["prompt"], "split": (decode or {}).get("split") or out["prompt"]["split"]}
    return out


def _metadata(cm, opset: int, external: bool, outputs: list, records: list) -> dict:
    sg = cm.step_graph
    inputs, _ = io_names(sg.state, sg.extra_inputs)
    recipe = str(cm.recipe) if cm.recipe is not None else ""
    try:
        report = cm.report().to_dict()
    except Exception:  # noqa: BLE001 - the report is informative only; never block an export on it
        report = None
    info = sg.info
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphwright_version": __version__,
        "torch_version": torch.__version__,
        "recipe": recipe or "identity",
        "opset": opset,
        "model_file": MODEL,
        "external_data": EXTERNAL_DATA if external else None,
        "inputs": inputs,
        "outputs": outputs,
        "state": [spec_to_json(s) for s in sg.state],
        "extra_inputs": [{"name": x.name, "kind": x.kind, "doc": x.doc, "meta": dict(x.meta)} for x in sg.extra_inputs],
        "runtime_ops": records,
        # evict(block=N): the runtime runs a prompt as steps of N tokens (runtime.generate.Runtime's prefill_chunk)
        "prefill_chunk": sg.notes.get("prefill_chunk"),
        "model": {"architecture": info.architecture, "layers": info.num_layers, "heads": info.num_heads,
                  "kv_heads": info.num_kv_heads, "head_dim": info.head_dim, "vocab": info.vocab_size,
                  "eos": list(info.eos_token_id), "pad": info.pad_token_id, "dtype": str(info.dtype).replace("torch.", "")},
        "model_info": info_to_json(info),
        "layers": _layers(sg),
        "tokenizer": TOKENIZER_DIR if cm.tokenizer is not None else None,
        "report": report,
        "export": None,
        "verification": None,
    }


def export_onnx(cm, out_dir, opset: int = 23, external_data: bool = True, verify: bool = True,
                overwrite: bool = False, verify_steps: int = 3, verify_tokens: int = MAX_PROBE) -> Path:
    """Write ``cm`` (a ``CompiledModel``) to ``out_dir`` as ``model.onnx`` + ``graphwright.json``.

    ``external_data``: weights go to ``model.onnx.data`` next to the graph (needed above 2 GB,
    and lets ORT map them); False embeds them in one file. ``verify``: run the artifact in ONNX
    Runtime against the torch step graph on a left-padded batch-2 probe (a prefill long enough to
    cross the model's and the recipe's largest window / eviction budget, at most ``verify_tokens``
    tokens, at least 7; then ``verify_steps`` decode steps) and raise ``GraphwrightError`` on a mismatch (the artifact then
    records ``verification.passed: false`` and ``graphwright.load`` refuses it). ``overwrite``:
    allow writing into a non-empty folder that is not a previous export; only files a previous
    export recorded are ever replaced (``_prepare_dir``). Returns the output folder.

    ``graphwright.json`` records the seconds of each phase under ``export.phases`` (``phases.py``).
    """
    import onnx

    if not hasattr(cm, "step_graph"):
        raise TypeError(f"export_onnx expects a CompiledModel (from graphwright.compile); got {type(cm).__name__}")
    if "kvzip" in cm.step_graph.notes:
        from .kvzip_export import check_exportable

        check_exportable(cm.step_graph)
    if "rerotate" in cm.step_graph.notes:
        raise GraphwrightError("evict(..., rerotate=True) is not exported: the artifact's runtime would continue "
                               "positions from the prompt length, not from the kept count n the re-rotated keys end at "
                               "(runtime/rerotate.py); export without rerotate, or run the model with graphwright")
    if verify_steps < 0:
        raise ValueError(f"verify_steps must be >= 0 (decode steps after the prefill); got {verify_steps}")
    if isinstance(verify_tokens, bool) or not isinstance(verify_tokens, int) or verify_tokens < 7:
        raise ValueError(f"verify_tokens must be an int >= 7 (the probe's longest prompt); got {verify_tokens!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 23 <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be an int in [23, {onnx.defs.onnx_opset_version()}] (23: the Attention operator; "
                         f"{onnx.defs.onnx_opset_version()}: the newest the installed onnx knows); got {opset!r}")
    from .sliding_window import export_view, sliding_record

    cm = export_view(cm)  # sliding_window.py: native sliding layers hold only their window
    phases = Phases()
    out = Path(out_dir)
    with phases("prepare"):
        owned = _prepare_dir(out, overwrite, cm.tokenizer)
    path = out / MODEL
    prompt = {}
    plan = _decode_plan(cm.step_graph)
    job = _start_decode_job(cm, plan, out, opset, external_data, phases)  # decode_process.py: decode.onnx meanwhile
    try:
        saved = False
        try:
            outputs, records, _ = _to_onnx(cm, path, opset, external_data, phases, prompt=prompt)
            saved = True
        finally:
            if job is not None:  # the child may now save decode.onnx with its weights in model.onnx.data (or stop)
                job.model_saved(ok=saved)
        reference = None
        if job is not None and verify:  # this core would wait for the child: the torch side of the verification now
            with phases("verify_reference"):
                reference = torch_reference(cm, verify_steps, verify_tokens)
        appends = prompt.pop("appends", None) or {}
        unstitched = prompt.pop("unstitched", None)
        outputs = [o for o in outputs if o not in set(appends.values())]
        decode = _decode_onnx(cm, out, opset, external_data, phases, prefill=(outputs, records), appends=appends,
                              prompt=prompt, unstitched=unstitched, plan=plan, job=job)
        del unstitched
    finally:
        if job is not None:
            job.close()
    external = (out / EXTERNAL_DATA).exists()
    with phases("check"):
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # noqa: BLE001
            raise GraphwrightError(f"{path}: onnx.checker rejected the exported model: {str(exc).strip()[:500]}") from exc
    with phases("tokenizer"):
        tok_files = save_tokenizer(cm.tokenizer, out, TOKENIZER_DIR, owned) if cm.tokenizer is not None else []
    with phases("metadata"):
        meta = _metadata(cm, opset, external, outputs, records)
        meta["decode"] = decode
        meta["prompt"] = prompt
        meta["sliding_windows"] = sliding_record(cm.step_graph)
        meta["session_runs"] = session_runs(records, prompt, decode)
    _export_second_graphs(cm, out, opset, external_data, phases, meta)
    with phases("hash"):  # manifest.py: sha256 of every file written, checked by graphwright.load
        meta["files"] = record_files(out, [*_graph_files(), *tok_files])
    meta_path = out / METADATA
    meta["export"] = phases.to_json()
    if verify:  # until the probe passes, the artifact on disk is a failed one (an interrupted export too)
        meta["verification"] = {"passed": False, "error": "export verification did not finish"}
    meta_path.write_text(json.dumps(meta, indent=2))
    if verify:
        try:
            with phases("verify_session"):
                step = OnnxStep.from_metadata(path, meta, providers=["CPUExecutionProvider"])
            with phases("verify_probe"):
                meta["verification"] = verify_artifact(cm, step, decode_steps=verify_steps, max_probe_tokens=verify_tokens,
                                                       reference=reference)
            _verify_second_graphs(cm, out, phases, meta)
        except GraphwrightError as exc:
            meta["verification"] = {"passed": False, "error": str(exc)}
            raise
        finally:
            meta["export"] = phases.to_json()
            meta_path.write_text(json.dumps(meta, indent=2))
    return out


def _export_second_graphs(cm, out: Path, opset: int, external_data: bool, phases: Phases, meta: dict) -> None:
    """The graphs a generate-time pass runs besides the step: GemFilter's selection (``gemfilter_export.py``) and
    KVzip's replay (``kvzip_export.py``); each writes its ``graphwright.json`` entry into ``meta``."""
    if "gemfilter" in cm.step_graph.notes:  # the selection pass as a second, truncated graph
        from .gemfilter_export import export_selection

        with phases("gemfilter_export"):
            meta["gemfilter"] = export_selection(cm, out, opset, external_data)
    if "kvzip" in cm.step_graph.notes:  # evict(score='kvzip'): the replay step as a second graph
        from .kvzip_export import export_replay

        with phases("kvzip_export"):
            meta["kvzip"] = export_replay(cm, out, opset, external_data)


def _verify_second_graphs(cm, out: Path, phases: Phases, meta: dict) -> None:
    """Each second graph against its torch twin on the probe, recorded under ``meta["verification"]``."""
    if meta.get("gemfilter"):
        from .gemfilter_export import verify_selection

        with phases("verify_gemfilter"):
            meta["verification"]["gemfilter_selection"] = verify_selection(cm, out, meta["gemfilter"])
    if meta.get("kvzip"):
        from .kvzip_export import verify_replay

        with phases("verify_kvzip"):
            meta["verification"]["kvzip_replay"] = verify_replay(cm, out, meta["kvzip"])
