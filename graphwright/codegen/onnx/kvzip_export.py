"""KVzip (arXiv 2505.23416) in the artifact: the replay step exported as a second ONNX graph.

``evict(score="kvzip")`` compresses after the prompt step: a *replay* prompt step ("Repeat the previous
context exactly." + the chat suffix + a context chunk) runs on a copy of the context's cache, and every
layer's replay queries score the context keys (``runtime/kvzip_replay.py``, ``ops/scorers/kvzip.py``).
``model.onnx`` is the packed-cache step graph, which only appends; the export writes the replay graph too
(``ops/kvzip_graph.replay_graph``, the graph the torch runtime lowers):

    kvzip_replay.onnx: (input_ids, positions, logits_index, state...) -> replay_{q,k,k_pos}<l> per KVzip layer

the attention inputs of each KVzip layer (q [B, H, T_r, D] post-RoPE; k [B, Hk, Hk*T + T_r, D], the packed
cache expanded to every KV head then the replay keys; k_pos alike), the LM head and the state outputs dropped
(dead code). ``graphwright.load`` runs it per row and chunk after the prompt step (``runtime/kvzip_onnx.py``);
the scores (``replay_scores``), the kept sets (``keep_sets``) and the compaction (``compact_packed``) run
host-side in torch with the torch runtime's own code, as the eviction ops of the graph/runtime split do
(``split.py``): index bookkeeping over a few [Hk, n] score rows per layer, the same code on both sides, so
ORT and the torch runtime keep the same pairs whenever their scores agree to ~1e-6 (no near tie).
The replay graph's large weights point into ``model.onnx.data`` (``shared_weights.py``): no second copy.
Verified at export (``verify_replay``): its outputs against the torch replay graph on a probe context,
k_pos equal, q and k within the logits tolerance.

``graphwright.json["kvzip"]``: ``model_file``, ``outputs``, ``layers`` ([layer, k, v, positions state names]),
``scales`` (each layer's attention scale), ``settings`` and ``replay`` (the pass's notes: budget, sinks, chunk;
the replay prompt's token ids), checked by ``metadata_schema._kvzip``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...errors import GraphwrightError
from ...ops.kvzip_graph import replay_graph

REPLAY_MODEL = "kvzip_replay.onnx"
REPLAY_DATA = REPLAY_MODEL + ".data"


def output_names(layers: list[int]) -> list[str]:
    """``replay_q<l>``, ``replay_k<l>``, ``replay_k_pos<l>`` per layer (never a state input's name, e.g. ``k0``)."""
    return [f"replay_{name}{layer}" for layer in layers for name in ("q", "k", "k_pos")]


def check_exportable(sg) -> None:
    """Refuse (before anything is written) what the replay graph cannot carry: latent layers, extra graph inputs
    (steering)."""
    latent = sg.notes.get("kvzip", {}).get("latent")
    if latent:
        raise GraphwrightError(f"evict(score='kvzip') on latent (lowrank_kv) layers {latent} is not exported: their replay "
                               "keys are rebuilt per KV head from the latent rows in graphwright's torch runtime; "
                               "export KVzip without lowrank_kv, or run the model with graphwright")
    if sg.extra_inputs:
        raise GraphwrightError("evict(score='kvzip') with extra graph inputs (steering) is not exported: the replay "
                               "graph would need them too, and the replay refuses emphasis anyway; export without steer")


def export_replay(cm, out: Path, opset: int, external_data: bool) -> dict:
    """Write ``kvzip_replay.onnx`` (weights shared with ``model.onnx.data`` when possible); returns its
    ``graphwright.json`` entry."""
    from .export import EXTERNAL_DATA, MODEL, dynamic_shapes, example_inputs, io_names
    from .split import RUNTIME_OPS
    from .translations import translation_table

    sg = cm.step_graph
    check_exportable(sg)
    notes = sg.notes["kvzip"]
    layers = [int(row[0]) for row in notes["layers"]]
    gm, scales = replay_graph(sg.gm, layers)
    if any(n.op == "call_function" and n.target in RUNTIME_OPS for n in gm.graph.nodes):
        raise GraphwrightError("evict(score='kvzip') after another eviction pass is not exported: the replay graph "
                               "would need the runtime's eviction op between its layers")
    inputs, _ = io_names(sg.state)
    outputs = output_names(layers)
    t0 = time.perf_counter()
    try:
        ep = torch.export.export(gm, example_inputs(sg.state), dynamic_shapes=dynamic_shapes(sg.state), strict=False)
        program = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=translation_table(),
                                    opset_version=opset, input_names=inputs, output_names=outputs,
                                    optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with what failed
        raise GraphwrightError(f"exporting the KVzip replay graph failed: {type(exc).__name__}: "
                               f"{str(exc).strip()[:500]}") from exc
    shared = False
    if external_data and (out / EXTERNAL_DATA).exists():
        from .shared_weights import save_sharing

        shared = save_sharing(program, out / REPLAY_MODEL, out / MODEL)
    if not shared:
        program.save(str(out / REPLAY_MODEL), external_data=external_data)
    return {"model_file": REPLAY_MODEL, "outputs": outputs, "layers": [list(row) for row in notes["layers"]],
            "scales": [scales[layer] for layer in layers], "settings": dict(notes["settings"]),
            "replay": dict(notes["replay"]), "shares_weights": shared, "export_s": round(time.perf_counter() - t0, 2)}


class OnnxReplay:
    """The exported replay graph as the torch replay's function: ``(input_ids, positions, logits_index, *state)``
    -> [q, k, k_pos per layer] (torch tensors, CPU)."""

    def __init__(self, path: Path, entry: dict, state_specs, providers=None, session_options=None, weights=None):
        from .artifact import default_providers
        from .session_weights import file_session

        # weights: the artifact's mapped weights (session_weights.py), shared with the step's sessions
        self.session = file_session(Path(path) / entry["model_file"], session_options, providers or default_providers(),
                                    weights)
        got = [o.name for o in self.session.get_outputs()]
        if got != list(entry["outputs"]):
            raise GraphwrightError(f"{Path(path) / entry['model_file']}: outputs {got[:6]} do not match graphwright.json "
                                   f"kvzip.outputs {list(entry['outputs'])[:6]}; re-export the model")
        self.names = ["input_ids", "positions", "logits_index", *(s.name for s in state_specs)]
        self.input_names = [i.name for i in self.session.get_inputs()]  # unused inputs may be pruned
        unknown = sorted(set(self.input_names) - set(self.names))
        if unknown:
            raise GraphwrightError(f"{Path(path) / entry['model_file']}: unknown graph inputs {unknown[:4]}; "
                                   "re-export the model")

    def __call__(self, *tensors):
        feeds = dict(zip(self.names, tensors))
        res = self.session.run(None, {n: feeds[n].detach().cpu().contiguous().numpy() for n in self.input_names})
        return [torch.from_numpy(r) for r in res]


@torch.inference_mode()
def verify_replay(cm, out: Path, entry: dict, replay_tokens: int = 6) -> dict:
    """The exported replay graph against the torch replay graph: a probe row's prompt step (torch), then
    ``replay_tokens`` replay ids after it through both; k_pos equal, q and k within the logits tolerance."""
    from ..lower import lower
    from .export import TOLERANCE
    from .export_probe import probe

    sg = cm.step_graph
    ids, _ = probe(sg.info.vocab_size)
    ids = ids[:1]  # the unpadded row: the replay runs per row
    T = ids.shape[1]
    step = lower(sg.gm, cm.backend_object)
    state = list(step(ids, torch.arange(T)[None], torch.tensor([T - 1]), *sg.init_state(1))[1:])
    rids = ids[:, :replay_tokens]
    args = (rids, torch.arange(T, T + rids.shape[1])[None], torch.tensor([rids.shape[1] - 1]), *state)
    gm, _ = replay_graph(sg.gm, [int(row[0]) for row in entry["layers"]])
    want = lower(gm, cm.backend_object)(*args)
    got = OnnxReplay(out, entry, sg.state, providers=["CPUExecutionProvider"])(*args)
    tol = TOLERANCE.get(sg.info.dtype, 1e-3)
    worst = 0.0
    for name, w, g in zip(entry["outputs"], want, got):
        if tuple(w.shape) != tuple(g.shape):
            raise GraphwrightError(f"ONNX verification of the KVzip replay graph failed: {name} shape {list(g.shape)} "
                                   f"!= torch {list(w.shape)}")
        if name.startswith("replay_k_pos"):
            if not torch.equal(w, g):
                raise GraphwrightError(f"ONNX verification of the KVzip replay graph failed: {name} differs")
            continue
        diff = float((w.float() - g.float()).abs().max())
        worst = max(worst, diff)
        if not diff <= tol:  # also catches NaN
            raise GraphwrightError(f"ONNX verification of the KVzip replay graph failed: max |{name} difference| "
                                   f"{diff:.3g} > {tol:g}")
    return {"passed": True, "max_abs_diff": worst, "tolerance": tol, "replay_tokens": int(rids.shape[1])}
