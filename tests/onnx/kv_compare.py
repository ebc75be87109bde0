"""What an ONNX Runtime generation held vs the torch runtime on the same prompt.

Both runtimes keep the same tokens per (row, layer, KV head): ``kept_tokens_per_head`` must be equal.
Their bytes are equal except where the decode graph grows a layer's slots at run time
(``graphwright.json["decode"]["capacity"][state]["grow"]``, ``codegen/onnx/decode_slots.py``): such a layer
holds up to ``GROW_SLACK`` empty slots (-1) beyond the torch slots, so its bytes may exceed torch's by at most
``GROW_SLACK`` slots of the widest per-token cache (K and V of every KV head) in every layer.
"""

from __future__ import annotations

from graphwright.codegen.onnx.decode_slots import GROW_SLACK


def assert_onnx_cache_like_torch(torch_stats: dict, onnx_stats: dict, meta: dict, info, batch: int) -> None:
    assert onnx_stats["kept_tokens_per_head"] == torch_stats["kept_tokens_per_head"]
    grows = any(c.get("grow") for c in ((meta.get("decode") or {}).get("capacity") or {}).values() if isinstance(c, dict))
    if not grows:
        assert onnx_stats["kv_bytes"] == torch_stats["kv_bytes"]
        return
    slack = GROW_SLACK * batch * info.num_layers * 2 * info.num_kv_heads * info.head_dim * 4
    assert torch_stats["kv_bytes"] <= onnx_stats["kv_bytes"] <= torch_stats["kv_bytes"] + slack, (onnx_stats["kv_bytes"], torch_stats)
