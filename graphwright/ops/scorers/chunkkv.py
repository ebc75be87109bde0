"""ChunkKV (arXiv 2502.00299, kvpress ``chunkkv_press.py``): keep whole chunks of a base score.

Rule: chunk c covers positions [c*L, (c+1)*L) (L = ``chunk``); its score is the mean over its
evictable positions of the base score, summed over the KV heads (``chunk_heads="sum"``: the paper's
rule, so every head keeps the same chunks) or per head (``"each"``). The top max(1, n // L) chunks
are kept (n = the head's token budget after sinks and window; ties: earliest chunk); a trailing
partial chunk has its own score. ``score="chunkkv"`` is SnapKV's window score in chunks of 20
(kvpress's chunk size; the paper's is [unconfirmed]); ``chunk=`` wraps any other scorer. Layer-wise
index reuse: ``evict(chunk_reuse=L)`` (``policy_scored.reuse_keep``). Exact setting: budget >= length; chunk=1 with ``"each"`` is the
base scorer (tested).
"""

from __future__ import annotations

import torch

from ..eviction_ref import topk_mask


def chunk_keep(score, cand, k_pos, count, chunk: int, head_sum: bool):
    """[B, Hk, S] bool: candidates in the top chunks; ``count`` [B, Hk] token budget per head."""
    B, Hk, S = score.shape
    cid = torch.where(cand, k_pos // chunk, torch.zeros_like(k_pos))
    n = int(cid.max()) + 1 if cid.numel() else 1
    s = score.float().masked_fill(~cand, 0.0)
    tot = torch.zeros(B, Hk, n).scatter_add_(2, cid, s)
    num = torch.zeros(B, Hk, n).scatter_add_(2, cid, cand.float())
    mean = tot / num.clamp(min=1)
    present = num > 0
    if head_sum:
        mean = mean.sum(dim=1, keepdim=True).expand(B, Hk, n)
        present = present.any(dim=1, keepdim=True).expand(B, Hk, n)
    keep_chunks = torch.where(count > 0, (count // chunk).clamp(min=1), torch.zeros_like(count))
    chosen = topk_mask(mean, present, keep_chunks)  # [B, Hk, n]
    return cand & chosen.gather(2, cid)
