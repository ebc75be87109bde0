"""One mapped copy of an artifact's weights for its sessions (``codegen/onnx/session_weights.py``).

Opt-in (``graphwright.load(share_weights=True)``). The invariant: with the weights shared, every step returns what it returns when each session loads its own copy
(MLAS without prepacking sums in another order: logits to 1e-5, the same tokens), both graphs read the same mapped
regions, a caller's options reused for another artifact never feed it the first one's weights, options that ask for
prepacked weights are obeyed, and a weights file too short for its graph is named as corrupt.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import onnx
import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx import session_weights
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.errors import GraphwrightError
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop


def _regions(path) -> set:
    graph = onnx.load(str(path), load_external_data=False).graph
    out = set()
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in t.external_data}
            out.add((ext["location"], int(ext.get("offset", 0)), int(ext["length"])))
    return out


def _generate(cm, step, steps=16):
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=3)
    logits, tokens, _ = decode_loop(SimpleNamespace(step_graph=cm.step_graph, _step=step), ids, mask, steps)
    return logits, tokens


@pytest.mark.parametrize("recipe", ["streaming(sinks=2, window=6)", "h2o(heavy=4, recent=4)"])
def test_prompt_and_decode_sessions_share_one_mapped_copy(onnx_artifact, recipe):
    cm, folder = onnx_artifact("tiny-llama", recipe)
    meta = json.loads((folder / "graphwright.json").read_text())
    runs = {}
    for shared in (False, True):
        weights = session_weights.ArtifactWeights(folder) if shared else None
        step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"], weights=weights)
        assert step.decode is not None  # the artifact has a decode graph: two sessions
        runs[shared] = (step, *_generate(cm, step))
    (off, la, ta), (on, lb, tb) = runs[False], runs[True]
    assert off.weights is None
    model_regions, decode_regions = _regions(folder / "model.onnx"), _regions(folder / meta["decode"]["model_file"])
    assert decode_regions <= model_regions  # decode.onnx points into model.onnx.data (shared_weights.py)
    # one OrtValue per region of the file, whichever graph named it first; the bytes mapped are the file's regions
    assert len(on.weights._values) == len(model_regions)
    assert on.weights.mapped_bytes == sum(length for _, _, length in model_regions)
    assert torch.equal(ta, tb)
    assert (la - lb).abs().max().item() < 1e-5


def test_a_callers_options_serve_two_artifacts_each_with_its_own_weights(onnx_artifact):
    import onnxruntime as ort

    outs = {}
    for model in ("tiny-llama", "tiny-qwen2"):
        cm, folder = onnx_artifact(model, "streaming(sinks=2, window=6)")
        fresh = gw.load(folder, providers=["CPUExecutionProvider"])
        assert fresh.weights is None  # off by default
        outs[model] = (cm, folder, _generate(cm, fresh.step))
    shared = ort.SessionOptions()  # one options object for both loads, as a caller might keep
    for model, (cm, folder, (logits, tokens)) in outs.items():
        m = gw.load(folder, providers=["CPUExecutionProvider"], session_options=shared, share_weights=True)
        assert m.step.weights is not None and m.step.weights.mapped_bytes > 0
        got_logits, got_tokens = _generate(cm, m.step)
        assert torch.equal(got_tokens, tokens), model  # the second load is not fed the first one's weights
        assert (got_logits - logits).abs().max().item() < 1e-6, model
    # ONNX Runtime cannot unset a config key: the caller's options come back with prepacking off
    assert shared.get_session_config_entry(session_weights.PREPACK_KEY) == "1"


def test_options_that_ask_for_prepacked_weights_keep_a_copy_per_session(onnx_artifact):
    import onnxruntime as ort

    cm, folder = onnx_artifact("tiny-llama", "streaming(sinks=2, window=6)")
    so = ort.SessionOptions()
    so.add_session_config_entry(session_weights.PREPACK_KEY, "0")
    m = gw.load(folder, providers=["CPUExecutionProvider"], session_options=so, share_weights=True)
    assert m.step.weights.mapped_bytes == 0  # nothing attached: each session read the file itself, prepacked
    assert so.get_session_config_entry(session_weights.PREPACK_KEY) == "0"
    ref = gw.load(folder, providers=["CPUExecutionProvider"], share_weights=True)
    assert ref.step.weights.mapped_bytes > 0
    (la, ta), (lb, tb) = _generate(cm, m.step), _generate(cm, ref.step)
    assert torch.equal(ta, tb) and (la - lb).abs().max().item() < 1e-5


def test_a_weights_file_too_short_for_its_graph_is_named_corrupt(onnx_artifact, tmp_path):
    _, folder = onnx_artifact("tiny-llama", "streaming(sinks=2, window=6)")
    copy = tmp_path / "artifact"
    shutil.copytree(folder, copy)
    data = copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(GraphwrightError, match=r"does not fit model\.onnx\.data .*corrupt, re-export"):
        gw.load(copy, providers=["CPUExecutionProvider"], verify_hashes=False, share_weights=True)


def test_only_an_artifact_with_several_graphs_is_mapped_and_the_argument_is_checked(onnx_artifact):
    _, dense = onnx_artifact("tiny-llama", "identity")
    assert gw.load(dense, providers=["CPUExecutionProvider"], share_weights=True).weights is None  # one session
    _, evicting = onnx_artifact("tiny-llama", "streaming(sinks=2, window=6)")
    with pytest.raises(GraphwrightError, match="share_weights must be True, False or None"):
        gw.load(evicting, providers=["CPUExecutionProvider"], share_weights="yes")
