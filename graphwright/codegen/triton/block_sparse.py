"""Triton lowering of ``graphwright.block_sparse_attention`` (Quest / MoBA top-k key blocks).

Based on Quest (arXiv:2406.10774) and MoBA (arXiv:2502.13189); semantics are
``ops.block_sparse.block_sparse_reference``. Decode (T = 1): block selection (page statistics and
top-k, torch) as in the torch backend, then the kept blocks' columns are gathered per KV head
and run through the split-K decode kernel as a per-head cache whose dropped slots are -1: the
kernel's per-head k_pos path *is* the block mask, so no new kernel variant is needed. The
gather still copies the kept keys/values once (top_k * block columns per KV head); reading the
block list inside the kernel instead would save that copy (not done). Dense prefill uses the
prefill kernel; MoBA sparse prefill and non-standard layouts fall back to the reference.
"""

from __future__ import annotations

import torch

from ...ops.block_sparse import block_ids, block_sparse_reference, select_blocks
from .attention_decode import attention_decode
from .attention_prefill import attention_prefill


def block_sparse_triton(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill=False):
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if T > 1 and not prefill:
        return attention_prefill(q, k, v, q_pos, k_pos, scale)
    if T != 1 or k_pos.dim() != 2:
        return block_sparse_reference(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill)
    blk = block_ids(k_pos, block)  # [B, S], nondecreasing for the runtime's left-padded cache
    if bool((blk[:, 1:] < blk[:, :-1]).any()):
        return block_sparse_reference(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill)
    top, ok, nb = select_blocks(q, k, q_pos, k_pos, block, top_k, mode)  # [B, Hk, 1, kk]
    if nb <= top_k:  # every candidate block is kept: dense causal attention
        return attention_decode(q, k, v, q_pos, k_pos, scale)
    kk = top.shape[-1]
    starts = torch.searchsorted(blk.contiguous(), top.reshape(B, Hk * kk)).view(B, Hk, kk, 1)
    cols = starts + torch.arange(block, device=q.device)  # [B, Hk, kk, block]: kept blocks are contiguous
    inside = cols < S
    cols = cols.clamp(max=S - 1).view(B, Hk, kk * block)
    same = blk[:, None, :].expand(B, Hk, S).gather(2, cols) == top.reshape(B, Hk, kk, 1).expand(-1, -1, -1, block).reshape(B, Hk, -1)
    keep = inside.view(B, Hk, -1) & same & ok.reshape(B, Hk, kk, 1).expand(-1, -1, -1, block).reshape(B, Hk, -1)
    kp = torch.where(keep, k_pos[:, None, :].expand(B, Hk, S).gather(2, cols), -1)  # [B, Hk, L] per-head cache
    kg = k.gather(2, cols[..., None].expand(-1, -1, -1, D))
    vg = v.gather(2, cols[..., None].expand(-1, -1, -1, v.shape[-1]))
    return attention_decode(q, kg, vg, q_pos, kp, scale)
