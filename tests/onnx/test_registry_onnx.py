"""Registry-driven ONNX suite: every registered pass, and issue 16's compositions, export and give
the torch runtime's greedy tokens in ONNX Runtime.

The cases are ``tests/passes/backend_cases.py`` (every registered pass's lossy example, else its
exact one, on its first example model; then the named compositions), so a new pass is covered
without editing this file. For each: ``gw.export_onnx`` verifies the artifact against the torch
module (recorded as passed, logits within 1e-4), no graphwright op is left in the ONNX graph, and
``gw.load(artifact).generate`` on a left-padded batch (8 new tokens) equals ``cm.generate`` token for
token, with the same KV bytes. Steered recipes run with emphasis spans; the test checks the ONNX
steering input really acts (tokens or logits differ without it) and that no emphasis gives the
torch model's unsteered output. Artifacts are shared with ``test_passes.py`` (``conftest.py``), which
checks their op types and runtime ops and keeps the hand-picked settings the registry does not cover.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import graphwright as gw
from tests.onnx.kv_compare import assert_onnx_cache_like_torch
from tests.passes.backend_cases import backend_cases, emphasis_for
from tests.passes.registry_examples import prompt

GEN = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0)
CASES = backend_cases()


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_runtime_gives_the_torch_tokens(case, onnx_artifact):
    cm, out = onnx_artifact(*CASES[case])
    recipe = CASES[case][1]
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["recipe"] == str(cm.recipe) and meta["verification"]["passed"]
    assert meta["verification"]["max_abs_logit_diff"] <= 1e-4
    nodes = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert not any(n.startswith("graphwright") for n in nodes), nodes

    rt = gw.load(out)
    ids, mask = prompt()
    emphasis = emphasis_for(recipe)
    want = cm.generate(ids, attention_mask=mask, emphasis=emphasis, **GEN)
    torch_stats = dict(cm.last_stats)
    got = rt.generate(ids, attention_mask=mask, emphasis=emphasis, **GEN)
    assert got.shape == (2, ids.shape[1] + GEN["max_new_tokens"])
    assert torch.equal(got, want)
    assert_onnx_cache_like_torch(torch_stats, rt.last_stats, meta, cm.info, batch=2)
    if emphasis is not None:  # the steering input reached the ONNX graph; none gives the unsteered model
        real = mask.bool()
        plain = rt.logits(ids, mask)
        assert (plain[real] - cm.logits(ids, mask)[real]).abs().max() <= 1e-4
        assert not torch.allclose(rt.logits(ids, mask, emphasis=emphasis)[real], plain[real])
