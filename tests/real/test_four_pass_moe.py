"""Issue 16's four-pass recipe on the real MoE model: fuse_moe + lowrank_kv + h2o + steer.

``smollm2-135m-moe`` (SmolLM2 upcycled into a Mixtral-style MoE with real weights), the passes
written in an order the compiler must change, compiled, generated with steering emphasis so every
pass acts, exported to ONNX and run in ONNX Runtime with the same tokens and the same KV bytes.
"""

import json

import pytest
import torch

import graphwright as gw
from tests.onnx.kv_compare import assert_onnx_cache_like_torch

pytestmark = pytest.mark.slow

RECIPE = "steer(heads=[16, 20, 24], alpha=0.01) + h2o(heavy=0.25, recent=0.25) + fuse_moe + lowrank_kv(keep=0.6)"


def test_four_pass_moe_recipe_generates_and_exports(tmp_path):
    model, tok = gw.load_model("smollm2-135m-moe")
    cm = gw.compile(model, recipe=RECIPE, tokenizer=tok)
    order = cm.step_graph.notes["pass_order"]
    assert order["written"] == ["steer", "h2o", "fuse_moe", "lowrank_kv"]
    assert order["order"] == ["fuse_moe", "lowrank_kv", "h2o", "steer"]
    text = "Read carefully. The meeting moved to Thursday at noon. Earlier notes said Monday. When is the meeting?"
    ids = tok(text, return_tensors="pt").input_ids
    emphasis = [[(0, 12)]]
    gen = dict(max_new_tokens=12, eos_token_id=[])
    out = cm.generate(ids, emphasis=emphasis, **gen)
    stats = dict(cm.last_stats)
    assert out.shape == (1, ids.shape[1] + 12)
    assert stats["kv_bytes"] < 0.45 * stats["kv_bytes_dense"]  # latents (0.6) x H2O (~0.5 of the tokens)
    steered = (cm.logits(ids, emphasis=emphasis) - cm.logits(ids)).abs().max().item()
    assert steered > 1.0  # emphasis reached the steered heads (8.0 measured; greedy tokens happen to agree)
    folder = gw.export_onnx(cm, tmp_path / "four")
    rt = gw.load(folder)
    got = rt.generate(ids, emphasis=emphasis, **gen)
    assert torch.equal(got, out)
    assert_onnx_cache_like_torch(stats, rt.last_stats, json.loads((folder / "graphwright.json").read_text()), cm.info, batch=1)
