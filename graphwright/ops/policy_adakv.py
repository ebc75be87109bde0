"""Ops of head-adaptive / per-layer SnapKV on a packed per-layer cache (references in ``adakv_ref``).

* ``graphwright.evict_adakv(q, k, v, q_pos, k_pos, scale, budget, window, kernel, pool, adaptive, floor,
  layer, num_layers, beta, split) -> (k, v, k_pos)`` (``split``: "official" or "kvpress", ``adakv_ref.SPLITS``;
  required, since the ONNX graph/runtime split takes positional arguments only; the reference defaults it to
  "official", so runtime records written before it existed still run): k, v [B, 1, N, D] packed, k_pos [B, Hk, N];
* ``graphwright.pack_heads(x) -> [B, 1, Hk*T, D]`` and ``graphwright.packed_positions(pos, num_kv_heads)
  -> [B, Hk, Hk*T]``: a step's new tokens as packed slots.

Not an ``EvictionPolicy`` (its k and v have one head while k_pos has Hk), so registered here by
hand and added to ``EVICT_OPS``/``REFERENCES`` like the policies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adakv_ref import adakv_reference, pack_heads_reference, packed_fake, packed_positions_reference
from .eviction_policy import EVICT_OPS, REFERENCES


@torch.library.custom_op("graphwright::evict_adakv", mutates_args=())
def evict_adakv(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, budget: int, window: int,
                kernel: int, pool: str, adaptive: bool, floor: float, layer: int, num_layers: int,
                beta: float, split: str) -> tuple[Tensor, Tensor, Tensor]:
    """Ada-KV / PyramidKV SnapKV on packed slots: compress once after prefill; decode appends."""
    outs = adakv_reference(q, k, v, q_pos, k_pos, scale, budget, window, kernel, pool, adaptive, floor, layer,
                           num_layers, beta, split)
    ids = {id(k), id(v), id(k_pos)}
    return tuple(o.clone() if id(o) in ids else o for o in outs)


@evict_adakv.register_fake
def _(q, k, v, q_pos, k_pos, scale, budget, window, kernel, pool, adaptive, floor, layer, num_layers, beta, split):
    return packed_fake(k, v, k_pos)


@torch.library.custom_op("graphwright::pack_heads", mutates_args=())
def pack_heads(x: Tensor) -> Tensor:
    """[B, Hk, T, D] -> [B, 1, Hk*T, D] head-major."""
    return pack_heads_reference(x).clone()


@pack_heads.register_fake
def _(x):
    return x.new_empty(x.shape[0], 1, x.shape[1] * x.shape[2], x.shape[3])


@torch.library.custom_op("graphwright::packed_positions", mutates_args=())
def packed_positions(pos: Tensor, num_kv_heads: int) -> Tensor:
    """[B, T] -> [B, Hk, Hk*T]: each new slot visible in its own head's row only."""
    return packed_positions_reference(pos, num_kv_heads)


@packed_positions.register_fake
def _(pos, num_kv_heads):
    return pos.new_empty(pos.shape[0], num_kv_heads, num_kv_heads * pos.shape[1])


EVICT_ADAKV = torch.ops.graphwright.evict_adakv.default
PACK_HEADS = torch.ops.graphwright.pack_heads.default
PACKED_POSITIONS = torch.ops.graphwright.packed_positions.default
PACKED_OPS = (EVICT_ADAKV, PACK_HEADS, PACKED_POSITIONS)

EVICT_OPS.append(EVICT_ADAKV)
REFERENCES.update({EVICT_ADAKV: adakv_reference, PACK_HEADS: pack_heads_reference,
                   PACKED_POSITIONS: packed_positions_reference})
