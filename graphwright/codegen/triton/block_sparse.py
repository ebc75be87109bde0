"""Triton lowering of ``graphwright.block_sparse_attention`` (Quest / MoBA top-k key blocks).

Based on Quest (arXiv:2406.10774) and MoBA (arXiv:2502.13189); semantics are
``ops.block_sparse.block_sparse_reference``. Decode (T = 1): block selection (page statistics from the
cache state, top-k; torch) as in the torch backend, then the kept blocks' columns are gathered per KV head
and run through the split-K decode kernel as a per-head cache whose dropped slots are -1: the
kernel's per-head k_pos path *is* the block mask, so no new kernel variant is needed. The
gather still copies the kept keys/values once (top_k * block columns per KV head); reading the
block list inside the kernel instead would save that copy (not done). Dense prefill uses the
prefill kernel; MoBA sparse prefill and non-standard layouts fall back to the reference.
"""

from __future__ import annotations

import torch

from ...ops.block_sparse import block_sparse_reference, decode_columns, page_inputs
from .attention_decode import attention_decode
from .attention_prefill import attention_prefill


def block_sparse_triton(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill=False, page_a=None, page_b=None):
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if T > 1 and not prefill:
        return attention_prefill(q, k, v, q_pos, k_pos, scale)
    plan = decode_columns(q, k, q_pos, k_pos, block, top_k, mode, page_inputs(mode, page_a, page_b)) if T == 1 else "reference"
    if plan == "reference":
        return block_sparse_reference(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill, page_a, page_b)
    if plan == "dense":  # every candidate block is kept: dense causal attention
        return attention_decode(q, k, v, q_pos, k_pos, scale)
    cols, keep = plan
    kp = torch.where(keep, k_pos[:, None, :].expand(B, Hk, S).gather(2, cols), -1)  # [B, Hk, L] per-head cache
    kg = k.gather(2, cols[..., None].expand(-1, -1, -1, D))
    vg = v.gather(2, cols[..., None].expand(-1, -1, -1, v.shape[-1]))
    return attention_decode(q, kg, vg, q_pos, kp, scale)
