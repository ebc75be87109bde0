"""Pure-torch references of ThinK key-channel pruning (arXiv 2407.21018): the definition of its ops.

ThinK ("ThinK: Thinner Key Cache by Query-Driven Pruning"; official code
``SalesforceAIResearch/ThinK``, ``ThinK_eager/src/kv_pruning_utils.py::key_pruner_query_driven``)
stores old keys with only their most significant channels. Once, at the end of prefill:

* channel score per KV head: ``score[c] = mean_t Q_w[t, c]^2 * mean_s K[s, c]^2`` with ``Q_w`` the last
  ``window`` (post-RoPE) prompt queries and ``K`` every key the cache keeps (after token eviction).
  This ranks channels exactly like the paper's ``||Q_w[:, c] K[:, c]^T||_F`` (``||a b^T||_F^2 =
  ||a||^2 ||b||^2``). Padding query rows and empty slots (position -1) are left out of the means.
* GQA: the query energy ``mean_t Q_w^2`` [B, H, D] of the g query heads reading one KV head is pooled
  (``pool="mean"``, kvpress ``ThinKPress``; or ``"max"``), so each KV head keeps one channel set and the
  narrower keys really are stored once per KV head.
* the ``keep`` highest-scoring channels per (row, KV head) are kept (ties: the lower channel index),
  listed in increasing order: ``channels`` [B, Hk, 1, keep] int64.
* keys of every slot but the last ``recent`` are stored as ``k[..., channels]`` [B, Hk, S - recent, keep];
  the last ``recent`` slots and every later (decode) token stay full width. Values are never pruned.

Attention then reads ``cat([think_expand(k_pruned, channels), k_full])``: the pruned keys scattered
back to D channels with zeros elsewhere, so ``q . k_expanded = q[kept] . k_pruned`` exactly and the
logit scale stays ``1/sqrt(D)`` of the original head dim (no rescaling by ``sqrt(keep)``).

Slot layout: slots are right-aligned per (row, KV head) before the split (empty slots first, then the
kept tokens in slot order), so the last ``recent`` slots are each row's last ``recent`` tokens even
after an eviction op compacted the cache to the front. With shared [B, S] positions (no eviction) the
cache of a left-padded prefill is right-aligned already and is left as it is.
"""

from __future__ import annotations

import torch

from .eviction_ref import per_head_positions

POOLS = ("mean", "max")


def query_energy(q: torch.Tensor, q_pos: torch.Tensor, window: int, num_kv_heads: int, pool: str) -> torch.Tensor:
    """[B, Hk, D] fp32: mean over the last ``window`` real query rows of q^2, pooled over each KV head's g query heads."""
    if pool not in POOLS:
        raise ValueError(f"think: pool must be one of {list(POOLS)}; got {pool!r}")
    B, H, T, D = q.shape
    w = min(window, T)
    real = (q_pos[:, T - w:] >= 0).float()  # [B, w]
    e = (q[:, :, T - w:].float() ** 2 * real[:, None, :, None]).sum(2) / real.sum(1).clamp(min=1)[:, None, None]
    e = e.view(B, num_kv_heads, H // num_kv_heads, D)
    return e.mean(2) if pool == "mean" else e.amax(2)


def key_energy(k: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, Hk, D] fp32: mean over the real slots (position >= 0) of k^2."""
    real = (per_head_positions(k_pos, k.shape[1]) >= 0).float()  # [B, Hk, S]
    return (k.float() ** 2 * real[..., None]).sum(2) / real.sum(-1).clamp(min=1)[..., None]


def channel_scores(q, k, q_pos, k_pos, window: int, pool: str) -> torch.Tensor:
    """[B, Hk, D] fp32 ThinK channel scores (query energy x key energy)."""
    return query_energy(q, q_pos, window, k.shape[1], pool) * key_energy(k, k_pos)


def select_channels(score: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, Hk, keep] int64: the ``keep`` highest scores per (row, head), ties to the lower index, increasing order."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def right_align(k, v, k_pos):
    """Per (row, head): empty slots (position -1) first, then the real ones in slot order. Per-head k_pos only."""
    order = torch.sort((k_pos >= 0).to(torch.uint8), dim=-1, stable=True).indices  # [B, Hk, S]
    take = order[..., None]
    return (k.gather(2, take.expand(-1, -1, -1, k.shape[-1])), v.gather(2, take.expand(-1, -1, -1, v.shape[-1])),
            k_pos.gather(2, order))


def think_prune_reference(q, k, k_pruned, channels, k_full, v, q_pos, k_pos, keep: int, recent: int, window: int, pool: str):
    """-> (k_pruned, channels, k_full, v, k_pos) of the next step.

    Prefill (``channels`` has no row yet): score and select the channels on ``k`` (the layer's full-width
    cache after this step, token eviction included), right-align per-head caches, store the first
    S - ``recent`` slots narrow and the rest full width. Decode: the split is fixed; ``k_full`` (the
    full-width cache with this step's tokens appended) is the new full part, everything else is returned
    as it is.
    """
    if channels.shape[2] > 0:
        return k_pruned, channels, k_full, v, k_pos
    B, Hk, S, D = k.shape
    if not 1 <= keep <= D:
        raise ValueError(f"think: keep must be a channel count in [1, {D}]; got {keep}")
    ch = select_channels(channel_scores(q, k, q_pos, k_pos, window, pool), keep)
    if k_pos.dim() == 3:
        k, v, k_pos = right_align(k, v, k_pos)
    n_old = max(S - recent, 0)
    old = k[:, :, :n_old].gather(-1, ch[:, :, None, :].expand(B, Hk, n_old, keep))
    return old, ch[:, :, None, :], k[:, :, n_old:].clone(), v, k_pos


def think_expand_reference(k_pruned: torch.Tensor, channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, Hk, S_old, head_dim]: the narrow keys scattered back to their channels, zeros in the pruned ones."""
    B, Hk, S, _ = k_pruned.shape
    out = k_pruned.new_zeros(B, Hk, S, head_dim)
    if S == 0:
        return out
    return out.scatter_(-1, channels.expand(B, Hk, S, channels.shape[-1]), k_pruned)
