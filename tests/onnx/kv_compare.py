"""What an ONNX Runtime generation held vs the torch runtime on the same prompt.

Both runtimes keep the same tokens per (row, layer, KV head): ``kept_tokens_per_head`` must be equal.
Their bytes are equal except where the decode graph grows a layer's slots at run time
(``graphwright.json["decode"]["capacity"][state]["grow"]``, ``codegen/onnx/decode_slots.py``): such a layer
holds up to ``GROW_SLACK`` empty slots (-1) beyond the torch slots, so its bytes may exceed torch's by at most
``GROW_SLACK`` slots of the widest per-token cache (K and V of every KV head) in every layer.
"""

from __future__ import annotations

import torch

from graphwright.codegen.onnx.decode_slots import GROW_SLACK
from graphwright.runtime.score import stream_logits
from tests.conftest import left_padded_batch


def assert_onnx_cache_like_torch(torch_stats: dict, onnx_stats: dict, meta: dict, info, batch: int) -> None:
    assert onnx_stats["kept_tokens_per_head"] == torch_stats["kept_tokens_per_head"]
    grows = any(c.get("grow") for c in ((meta.get("decode") or {}).get("capacity") or {}).values() if isinstance(c, dict))
    if not grows:
        assert onnx_stats["kv_bytes"] == torch_stats["kv_bytes"]
        return
    slack = GROW_SLACK * batch * info.num_layers * 2 * info.num_kv_heads * info.head_dim * 4
    assert torch_stats["kv_bytes"] <= onnx_stats["kv_bytes"] <= torch_stats["kv_bytes"] + slack, (onnx_stats["kv_bytes"], torch_stats)


def assert_onnx_runs_like_torch(cm, rt, meta: dict, gen: dict) -> dict:
    """The ONNX Runtime artifact ``rt`` against the torch runtime ``cm`` on a left-padded batch of 2 (vocab 256):
    logits over a 24-column prefill and 30 decode steps within 1e-4 on the real tokens, then the greedy tokens of
    ``generate(**gen)`` equal and the same cache held (``assert_onnx_cache_like_torch``). Returns torch's stats."""
    ids, mask = left_padded_batch(256, (54, 47), seed=4)  # prefill 24 columns (17 real in row 2), 30 decode steps
    want, _ = stream_logits(cm._step, cm.runtime_graph.state, ids, mask, 24)
    got, _ = stream_logits(rt.step, rt.state_specs, ids, mask, 24)
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-4

    ids, mask = left_padded_batch(256, (30, 21), seed=4)
    tokens = cm.generate(ids, attention_mask=mask, **gen)
    torch_stats = dict(cm.last_stats)
    assert torch.equal(rt.generate(ids, attention_mask=mask, **gen), tokens)
    assert_onnx_cache_like_torch(torch_stats, rt.last_stats, meta, cm.step_graph.info, 2)
    return torch_stats
