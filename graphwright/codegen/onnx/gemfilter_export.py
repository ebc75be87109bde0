"""GemFilter in the artifact: the selection pass exported as a second, truncated ONNX graph.

``gemfilter`` leaves the step graph unchanged and, at generate time, scores the prompt with the
graph truncated after layer r (``runtime/gemfilter.py``). The export writes that truncated graph
too, ending in the token scores (last prompt query against every key, summed over query heads):

    gemfilter_select.onnx: (input_ids, positions, logits_index, state...) -> scores [B, T]

``graphwright.load`` runs it before generating, then pools, takes the top ``keep`` ids in prompt
order and generates from them with the main graph, as ``CompiledModel.generate`` does. Only the
layers up to r are in the file (dead-code elimination), and the verification compares its
scores with the torch truncated graph on the probe.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...errors import GraphwrightError
from ...ops.gemfilter import token_scores, truncate_after_layer

SELECT_MODEL = "gemfilter_select.onnx"
SELECT_DATA = SELECT_MODEL + ".data"


def scores_graph(sg) -> torch.fx.GraphModule:
    """The step graph truncated after the GemFilter layer, returning the token scores [B, T]."""
    s = sg.notes["gemfilter"]["settings"]
    gm = truncate_after_layer(sg.gm, s["layer"])
    out = next(n for n in gm.graph.nodes if n.op == "output")
    q, k = out.args[0]
    with gm.graph.inserting_before(out):
        scores = gm.graph.call_function(token_scores, (q, k))
    out.args = (scores,)
    gm.graph.lint()
    gm.recompile()
    return gm


def export_selection(cm, out: Path, opset: int, external_data: bool) -> dict:
    """Write ``gemfilter_select.onnx``; returns its ``graphwright.json`` entry."""
    from .export import dynamic_shapes, example_inputs, io_names
    from .split import RUNTIME_OPS
    from .translations import translation_table

    sg = cm.step_graph
    if sg.extra_inputs:
        raise GraphwrightError("gemfilter with extra graph inputs (steering) cannot be exported: emphasis spans "
                               "index the full prompt, which GemFilter shortens")
    gm = scores_graph(sg)
    if any(n.op == "call_function" and n.target in RUNTIME_OPS for n in gm.graph.nodes):
        raise GraphwrightError("gemfilter below an eviction pass cannot be exported: the selection layers would need "
                               "the runtime's eviction between steps; put the eviction after the GemFilter layer or "
                               "export without gemfilter")
    inputs, _ = io_names(sg.state)
    t0 = time.perf_counter()
    try:
        ep = torch.export.export(gm, example_inputs(sg.state), dynamic_shapes=dynamic_shapes(sg.state), strict=False)
        program = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=translation_table(),
                                    opset_version=opset, input_names=inputs, output_names=["scores"],
                                    optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with what failed
        raise GraphwrightError(f"exporting the GemFilter selection graph failed: {type(exc).__name__}: "
                               f"{str(exc).strip()[:500]}") from exc
    program.save(str(out / SELECT_MODEL), external_data=external_data)
    return {**sg.notes["gemfilter"]["settings"], "model_file": SELECT_MODEL,
            "export_s": round(time.perf_counter() - t0, 2)}


class OnnxSelection:
    """The exported selection graph as a function ``(input_ids, attention_mask) -> kept ids per row``."""

    def __init__(self, path: Path, entry: dict, state_specs, providers=None, session_options=None, weights=None):
        from .session_weights import file_session

        self.entry = entry
        self.state_specs = state_specs
        # weights: the artifact's mapped weights (session_weights.py), shared with the step's sessions
        self.session = file_session(path / entry["model_file"], session_options, providers or ["CPUExecutionProvider"],
                                    weights)
        self.input_names = [i.name for i in self.session.get_inputs()]  # unused state inputs may be pruned

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        from ...capture.step_graph import positions_from_mask

        B, T = input_ids.shape
        state = [s.empty(B, torch.device("cpu")) for s in self.state_specs]
        tensors = dict(zip(["input_ids", "positions", "logits_index", *(s.name for s in self.state_specs)],
                           (input_ids, positions_from_mask(attention_mask), torch.tensor([T - 1]), *state)))
        feeds = {n: tensors[n].detach().cpu().contiguous().numpy() for n in self.input_names}
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def __call__(self, input_ids, attention_mask) -> list:
        from ...ops.gemfilter import kept_from_scores

        return kept_from_scores(self.scores(input_ids, attention_mask), attention_mask, self.entry["keep"],
                                self.entry["kernel"])


@torch.inference_mode()
def verify_selection(cm, out: Path, entry: dict) -> dict:
    """Scores of the exported selection graph vs the torch truncated graph on the export probe."""
    from ...capture.step_graph import positions_from_mask
    from ..lower import lower
    from .export_probe import probe

    sg = cm.step_graph
    ids, mask = probe(sg.info.vocab_size)
    T = ids.shape[1]
    want = lower(scores_graph(sg), cm.backend_object)(ids, positions_from_mask(mask), torch.tensor([T - 1]),
                                                 *sg.init_state(ids.shape[0]))
    got = OnnxSelection(out, entry, sg.state).scores(ids, mask)
    real = mask.bool()
    diff = float((got - want)[real].abs().max())
    tol = 1e-3 * max(1.0, float(want[real].abs().max()))
    if not diff <= tol:
        raise GraphwrightError(f"ONNX verification of the GemFilter selection graph failed: max |score difference| "
                               f"{diff:.3g} > {tol:.3g}")
    return {"passed": True, "max_abs_score_diff": diff, "tolerance": tol}
