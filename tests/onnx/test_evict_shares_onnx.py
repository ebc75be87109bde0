"""ONNX export of evict(score=..., rule='scores'): ``evict_adakv_scored`` with its head-score weights stays a cut
runtime op (``split.py``, the weights recorded as a plain list) and the packed cache's slot ops are translated; the
artifact runs like the torch runtime (logits, tokens, kept tokens per head, KV bytes) and the cache really shrinks."""

from __future__ import annotations

import json

import onnx

import graphwright as gw
from graphwright.ops.head_shares import share_weights
from tests.onnx.kv_compare import assert_onnx_runs_like_torch
from tests.passes.eviction_helpers import random_headset

GEN = dict(max_new_tokens=24, eos_token_id=[], pad_token_id=0)


def test_export_matches_torch(onnx_artifact, compiled_tiny, tmp_path_factory):
    info = compiled_tiny("tiny-llama").step_graph.info
    path, scores = random_headset(info, tmp_path_factory.mktemp("heads"), 7)
    cm, out = onnx_artifact("tiny-llama", f"evict(score='expected_attention', budget=10, window=2, rule='scores', gamma=2.0, "
                                          f"floor=0.0, headset='{path}')")
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    ops = meta["runtime_ops"]
    assert {r["op"] for r in ops} == {"graphwright::evict_adakv_scored"}
    weights = list(share_weights(scores.flatten().tolist(), 2.0, 0.01))
    for r in ops:  # the head-score weights ride along as a plain list, in the op's schema position
        assert r["args"][-2] == {"value": weights} and r["args"][-1] == {"value": r["layer"]}
    nodes = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert not any(n.startswith("graphwright") for n in nodes)
    torch_stats = assert_onnx_runs_like_torch(cm, gw.load(out), meta, GEN)
    assert torch_stats["kv_bytes"] < 0.7 * torch_stats["kv_bytes_dense"]
