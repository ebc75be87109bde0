"""Torch-backend block-sparse attention: gather the kept blocks, then SDPA over them.

Same semantics as ``graphwright.ops.block_sparse.block_sparse_reference`` (tested against it).
Decode (T = 1) gathers only the ``top_k * block`` keys and values of the kept blocks per KV head,
so the softmax and the value reads shrink from S to at most top_k * block columns; block
selection reads the page statistics the ``block_sparse`` pass keeps as cache state
(``graphwright.page_summary``: Quest min/max, MoBA mean; 1/block of the keys each), or recomputes
them from the whole cache when the op is called without them. Prefill and any non-standard
layout fall back to dense SDPA / the masked reference.
"""

from __future__ import annotations

import torch

from ...ops.block_sparse import block_sparse_reference, decode_columns, page_inputs
from .attention import attention_sdpa


def block_sparse_sdpa(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill=False, page_a=None, page_b=None):
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if T > 1 and not prefill:
        return attention_sdpa(q, k, v, q_pos, k_pos, scale)
    pages = page_inputs(mode, page_a, page_b)
    plan = decode_columns(q, k, q_pos, k_pos, block, top_k, mode, pages) if T == 1 else "reference"
    if plan == "reference":
        return block_sparse_reference(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill, page_a, page_b)
    if plan == "dense":  # every candidate block is kept: plain causal attention
        return attention_sdpa(q, k, v, q_pos, k_pos, scale)
    cols, keep = plan
    kp = k_pos[:, None, :].expand(B, Hk, S).gather(2, cols)
    keep = keep & (kp >= 0) & ((kp <= q_pos[:, None, :]) | (q_pos[:, None, :] < 0))  # [B, Hk, L]
    # one row gather over the flattened cache: whole D-wide rows are copied (much faster on CPU than
    # gather with an expanded index or advanced indexing)
    kg, vg = _gather_rows(k, cols), _gather_rows(v, cols)
    # one query row per head over at most top_k * block columns: plain fp32 matmuls beat masked SDPA here
    g = H // Hk
    scores = torch.matmul(q.reshape(B, Hk, g, D).float(), kg.float().transpose(-1, -2)) * scale  # [B, Hk, g, L]
    scores = scores.masked_fill(~keep[:, :, None, :], torch.finfo(torch.float32).min)
    out = torch.matmul(torch.softmax(scores, dim=-1), vg.float())  # [B, Hk, g, Dv]
    return out.reshape(B, H, 1, v.shape[-1]).to(v.dtype)


def _gather_rows(t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``t`` [B, Hk, S, D] at columns ``cols`` [B, Hk, L] -> [B, Hk, L, D], as one row gather.

    The cache is usually a view of a longer buffer (``cache_append``: rows of one head are
    ``stride(1) / D`` apart, not S); the gather indexes that buffer's rows directly instead of
    reshaping the view, which would copy the whole cache.
    """
    B, Hk, S, D = t.shape
    fits = t.storage_offset() + B * t.stride(0) <= t.untyped_storage().nbytes() // t.element_size()
    if t.stride(3) == 1 and t.stride(2) == D and t.stride(1) % D == 0 and t.stride(0) == Hk * t.stride(1) and fits:
        per_head = t.stride(1) // D
        flat = torch.as_strided(t, (B * Hk * per_head, D), (D, 1))
    else:
        per_head, flat = S, t.reshape(B * Hk * S, D)
    rows = (cols + (torch.arange(B * Hk, device=t.device) * per_head).view(B, Hk, 1)).flatten()
    return flat.index_select(0, rows).view(B, Hk, -1, D)
