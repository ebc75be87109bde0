"""evict(score=...) exports to ONNX: the generic scored op stays on the runtime side of the split
(``codegen/onnx/split.py`` keeps every registered eviction op), including the variant that reads the
layer's rotary table (Expected Attention) and the one with running state (cumulative attention).
ONNX Runtime generates the torch tokens (Finch too, whole-prompt and chunked, and its artifact refuses a reusable
context as the torch runtime does). ``rule='adaptive'`` (``evict_adakv_scored`` on the packed cache,
whose slot ops ``codegen/onnx/packed_cache.py`` translates) and ``chunk_reuse=`` (``evict_scored_reuse`` reads
the leader layer's kept positions, an earlier runtime op's result) and Finch (whole-prompt and ``chunk=``) are
compared with the torch runtime on a left-padded batch of 2: logits over a 24-column prefill and 30 decode steps (<= 1e-4), the final state tensors
(positions equal, K/V <= 1e-4), greedy tokens and the kept tokens per head and KV bytes (``kv_compare``)."""

from __future__ import annotations

import json

import pytest
import torch

import graphwright as gw
from graphwright.runtime.score import stream_logits
from tests.conftest import left_padded_batch
from tests.onnx.kv_compare import assert_onnx_cache_like_torch
from tests.passes.registry_examples import prompt

GEN = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0)
GEN_LONG = dict(max_new_tokens=24, eos_token_id=[], pad_token_id=0)


@pytest.mark.parametrize("recipe", ["evict(score='expected_attention', budget=8)",
                                    "evict(score='h2o', budget=8, window=2, when='every:3')",
                                    "evict(score='criticalkv', budget=8, window=3)",  # reads each layer's o_proj weight
                                    "snapkv(budget=8, window=2, heads='adaptive', split='kvpress')",
                                    # LagKV (a partition size) and Q-Filters (the layer's filters, a graph constant)
                                    "evict(score='lagkv', budget=8, lag=3, sinks=2)", "evict(score='qfilter', budget=8)",
                                    "evict(score='qfilter', budget=8, when='every:3')",
                                    # Finch: the question's window rows, whole-prompt and chunked selection (issue 20)
                                    "evict(score='finch', budget=8, window=3)",
                                    "evict(score='finch', budget=10, window=3, chunk=5)"])
def test_evict_exports_and_gives_the_torch_tokens(onnx_artifact, recipe):
    cm, out = onnx_artifact("tiny-llama", recipe)
    ids, mask = prompt()
    want = cm.generate(ids, attention_mask=mask, **GEN)
    kept = cm.last_stats["kept_tokens_per_head"]
    assert max(h for layer in kept for row in layer for h in row) < 14 + 8  # it evicted
    assert torch.equal(gw.load(out).generate(ids, attention_mask=mask, **GEN), want)


def test_finch_export_refuses_a_reusable_context(onnx_artifact):
    _, out = onnx_artifact("tiny-llama", "evict(score='finch', budget=8, window=3)")
    rt = gw.load(out)
    ids, mask = prompt()
    with pytest.raises(ValueError, match="finch.*question"):
        rt.prefill(ids, attention_mask=mask)


# issue 20 item 2: Ada-KV budgets for any per-head prefill scorer (packed cache, evict_adakv_scored) and ChunkKV's
# layer-wise index reuse (evict_scored_reuse reads the leader layer's kept positions: a runtime op result)
PACKED = {
    "knorm": ("evict(score='knorm', budget=10, window=2, rule='adaptive', floor=0.0)", {"graphwright::evict_adakv_scored"}),
    "keydiff": ("evict(score='keydiff', budget=10, window=2, rule='adaptive')", {"graphwright::evict_adakv_scored"}),
    "expected_attention": ("evict(score='expected_attention', budget=10, window=2, rule='adaptive')",
                           {"graphwright::evict_adakv_scored"}),
    "chunkkv": ("evict(score='chunkkv', budget=10, chunk=2, window=2, rule='adaptive')", {"graphwright::evict_adakv_scored"}),
    "criticalkv": ("evict(score='criticalkv', budget=10, window=2, rule='adaptive')",  # CriticalAdaKV: reads o_proj
                   {"graphwright::evict_adakv_scored"}),
    "chunk_reuse": ("evict(score='chunkkv', budget=9, chunk=2, window=1, chunk_reuse=2)",
                    {"graphwright::evict_scored", "graphwright::evict_scored_reuse"}),
    # issue 20: Finch (the question's window rows), whole-prompt and chunked: logits and kept caches too
    "finch": ("evict(score='finch', budget=10, window=3)", {"graphwright::evict_scored"}),
    "finch_chunk": ("evict(score='finch', budget=10, window=3, chunk=5)", {"graphwright::evict_scored"}),
}


@pytest.mark.parametrize("case", list(PACKED))
def test_adaptive_and_reuse_export_and_match_torch(onnx_artifact, case):
    recipe, runtime_ops = PACKED[case]
    cm, out = onnx_artifact("tiny-llama", recipe)
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    assert {r["op"] for r in meta["runtime_ops"]} == runtime_ops
    rt = gw.load(out)

    ids, mask = left_padded_batch(256, (54, 47), seed=4)  # prefill 24 columns (17 real in row 2), 30 decode steps
    want, want_state = stream_logits(cm._step, cm.runtime_graph.state, ids, mask, 24)
    got, got_state = stream_logits(rt.step, rt.state_specs, ids, mask, 24)
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-4
    for w, g, spec in zip(want_state, got_state, rt.state_specs):  # the same packed / compacted cache
        assert w.shape == g.shape, spec.name
        if spec.kind == "positions":
            assert torch.equal(w, g), spec.name  # the same kept positions, slot for slot
        else:
            assert (w.float() - g.float()).abs().max().item() <= 1e-4, spec.name

    ids, mask = left_padded_batch(256, (30, 21), seed=4)
    tokens = cm.generate(ids, attention_mask=mask, **GEN_LONG)
    torch_stats = dict(cm.last_stats)
    assert torch.equal(rt.generate(ids, attention_mask=mask, **GEN_LONG), tokens)
    assert_onnx_cache_like_torch(torch_stats, rt.last_stats, meta, cm.step_graph.info, 2)
    assert torch_stats["kv_bytes"] < 0.7 * torch_stats["kv_bytes_dense"]  # it evicted
