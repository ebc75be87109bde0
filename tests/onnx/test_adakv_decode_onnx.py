"""ONNX export of the decode-time Ada-KV cache (``h2o(heads='adaptive')``, ``evict(score='tova', rule='adaptive',
when='decode')``): the packed cache's slot ops are translated (``codegen/onnx/packed_cache.py``) and
``evict_adakv_decode`` is a cut runtime op, like ``evict_adakv``. Each artifact against the torch runtime on a
left-padded batch of 2: teacher-forced logits (<= 1e-4), greedy tokens (equal), kept tokens per head and KV bytes
(``kv_compare``); the cache really shrinks, so equal tokens are not the dense model's."""

from __future__ import annotations

import json

import onnx
import pytest

import graphwright as gw
from tests.onnx.kv_compare import assert_onnx_runs_like_torch

CASES = {
    "h2o": ("tiny-qwen2", "h2o(heavy=6, recent=2, heads='adaptive', floor=0.0)"),
    "tova": ("tiny-llama", "evict(score='tova', when='decode', rule='adaptive', budget=8, window=1)"),
}
GEN = dict(max_new_tokens=24, eos_token_id=[], pad_token_id=0)


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_torch(case, onnx_artifact):
    name, recipe = CASES[case]
    cm, out = onnx_artifact(name, recipe)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    assert {r["op"] for r in meta["runtime_ops"]} == {"graphwright::evict_adakv_decode"}
    rt = gw.load(out)

    torch_stats = assert_onnx_runs_like_torch(cm, rt, meta, GEN)
    assert torch_stats["kv_bytes"] < 0.7 * torch_stats["kv_bytes_dense"]
