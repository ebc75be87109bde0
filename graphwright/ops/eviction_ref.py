"""Pure-torch references of the KV-eviction ops (the definition of their semantics).

Layout shared by every eviction op (one layer, one step):

* ``q`` [B, H, T, D]: this step's queries, post-RoPE; ``q_pos`` [B, T] absolute positions, -1 = padding.
* ``k``, ``v`` [B, Hk, S, D]: the layer's cache *plus* this step's T new tokens (the last T slots).
* ``k_pos`` [B, Hk, S]: per-head absolute positions of those slots; -1 = empty/padding slot.
* per-slot side state (``score`` fp32, ``token_class`` int8) is [B, Hk, S] as well.

Selection returns ``keep`` [B, Hk, S] bool; ``compact`` gathers the kept slots of every (row, head)
to the front, in position order, and pads to the largest kept count with -1 positions. The result
is rectangular, so the step graph stays a pure function; padding slots are never attended because
the attention op ignores k_pos = -1.

Budgets are ``count + floor(frac * L)`` where L is the row's current length (its real tokens so
far, i.e. max(q_pos) + 1), so a fraction follows the sequence and an int count is fixed.
Grouped-query attention: scores are averaged over the g query heads of a KV head; a KV head keeps
one set for all of its query heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capture.ops import visible_mask

ROW_CHUNK = 256  # query rows per probability block: bounds prefill memory to g*256*S floats per KV head
SPECIAL, PUNCT = 1, 2  # token_class values (0 = other)
LADDER = ("special", "punct", "frequent", "local", "full")  # FastGen policy ids 0..4, each includes the previous


def row_length(q_pos: torch.Tensor) -> torch.Tensor:
    """[B] tokens seen so far per row (padding rows never count)."""
    return q_pos.max(dim=1).values + 1


def budget(count: int, frac: float, length: torch.Tensor) -> torch.Tensor:
    """[B] long: ``count + floor(frac * length)`` (1e-9 guards 0.3 * 10 = 2.9999...)."""
    return count + torch.floor(frac * length.double() + 1e-9).long()


def prob_blocks(q, k, q_pos, k_pos, scale, key_bias=None, rows=None):
    """Yield ``(t0, P)`` with P [B, Hk, g, t, S] fp32 softmax rows of queries t0..t0+t (padding rows zeroed).

    Same masking and fp32 softmax as ``attention_reference``, recomputed here so the attention op
    (and every fast backend of it) stays untouched; ``rows`` restricts to a slice of query rows.
    """
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    lo, hi = rows if rows is not None else (0, T)
    kf = k.float().transpose(-1, -2)
    for t0 in range(lo, hi, ROW_CHUNK):
        t1 = min(t0 + ROW_CHUNK, hi)
        qc = q[:, :, t0:t1].float().reshape(B, Hk, g, t1 - t0, D)
        s = torch.matmul(qc, kf[:, :, None]) * scale  # [B, Hk, g, t, S]
        if key_bias is not None:
            s = s + key_bias.float().view(B, Hk, g, 1, S)
        qp = q_pos[:, t0:t1]
        s = s.masked_fill(~visible_mask(qp, k_pos), torch.finfo(torch.float32).min)
        p = torch.softmax(s, dim=-1) * (qp >= 0)[:, None, None, :, None]
        yield t0, p


def colsum(q, k, q_pos, k_pos, scale, key_bias=None, rows=None) -> torch.Tensor:
    """[B, Hk, S] fp32: attention each key received, summed over real query rows, mean over g heads."""
    out = None
    for _, p in prob_blocks(q, k, q_pos, k_pos, scale, key_bias, rows):
        part = p.sum(dim=3).mean(dim=2)
        out = part if out is None else out + part
    return out


def topk_mask(score: torch.Tensor, cand: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S] bool: the ``k`` ([B] or [B, Hk]) highest-scoring candidates; ties go to the earlier slot."""
    s = score.float().masked_fill(~cand, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    k = k.view(k.shape[0], -1, 1) if k.dim() <= 2 else k
    return cand & (rank < k)


def compact(keep, k, v, k_pos, extras=()):
    """Gather kept slots per (row, head) to the front (position order kept), pad with k_pos = -1.

    Returns ``(k, v, k_pos, *extras)`` with S' = max kept count. Inputs are returned as they are
    when nothing is dropped (the lowered graph may alias; the custom-op wrappers copy).

    A ``v`` with one head while there are several KV heads ([B, 1, S, r]: a latent cache row shared
    by every head) can only be compacted with one set, so the heads' sets are merged first: a slot
    is kept for every head if any head keeps it (union).
    """
    keep = keep & (k_pos >= 0)
    B, Hk, S = keep.shape
    if v.shape[1] == 1 and Hk > 1:
        keep = keep.any(dim=1, keepdim=True).expand(B, Hk, S) & (k_pos >= 0)
    if bool(keep.all()):
        return (k, v, k_pos, *extras)
    count = keep.sum(dim=-1)
    n = int(count.max()) if keep.numel() else 0
    # a stable sort of "dropped?" puts the kept slots first and leaves them in slot (= position) order
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    valid = torch.arange(n, device=keep.device) < count[..., None]  # [B, Hk, n]

    def take(x):
        h = x.shape[1]  # Hk, or 1 for a shared payload (then every head has the same order)
        idx = order[:, :h] if x.dim() == 3 else order[:, :h, :, None].expand(B, h, n, x.shape[-1])
        m = valid[:, :h] if x.dim() == 3 else valid[:, :h, :, None]
        return x.gather(2, idx).masked_fill(~m, 0)

    pos = k_pos.gather(2, order).masked_fill(~valid, -1)
    return (take(k), take(v), pos, *[take(e) for e in extras])


def per_head_positions(k_pos: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    return k_pos if k_pos.dim() == 3 else k_pos[:, None, :].expand(-1, num_kv_heads, -1)


# ----------------------------------------------------------------------------------- H2O
def h2o_keep(score, k_pos, length, heavy_n, heavy_f, recent_n, recent_f) -> torch.Tensor:
    """Last ``recent`` positions plus the top ``heavy`` cumulative scores among the older ones."""
    valid = k_pos >= 0
    recent = budget(recent_n, recent_f, length)[:, None, None]
    is_recent = valid & (k_pos >= length[:, None, None] - recent)
    return is_recent | topk_mask(score, valid & ~is_recent, budget(heavy_n, heavy_f, length))


def h2o_accumulate_evict(attn_mass, k, v, q_pos, k_pos, score, heavy_n, heavy_f, recent_n, recent_f):
    """Add this step's attention column sums ``attn_mass`` [B, Hk, S] to ``score`` (new slots start at 0),
    then keep H2O's set. -> (k, v, k_pos, score). Shared by the reference and the torch prompt-step fast path."""
    B, Hk, S = k.shape[:3]
    score = torch.cat([score.float(), score.new_zeros(B, Hk, S - score.shape[2])], dim=2) + attn_mass
    keep = h2o_keep(score, k_pos, row_length(q_pos), heavy_n, heavy_f, recent_n, recent_f)
    return compact(keep, k, v, k_pos, (score,))


def h2o_reference(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """Accumulate this step's attention into ``score`` (new slots start at 0), then evict. -> (k, v, k_pos, score)."""
    return h2o_accumulate_evict(colsum(q, k, q_pos, k_pos, scale, key_bias), k, v, q_pos, k_pos, score,
                                heavy_n, heavy_f, recent_n, recent_f)


# ----------------------------------------------------------------------------------- SnapKV
def pool1d(x: torch.Tensor, kernel: int, pool: str) -> torch.Tensor:
    """Smooth [B, Hk, S] along S with stride 1, zero padding kernel//2 (SnapKV's avg_pool1d/max_pool1d)."""
    if kernel <= 1:
        return x
    B, Hk, S = x.shape
    flat = x.reshape(B * Hk, 1, S)
    if pool == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)  # count_include_pad: divide by kernel
    else:
        out = F.max_pool1d(F.pad(flat, (kernel // 2, kernel // 2)), kernel, stride=1)  # scores >= 0: 0-pad = -inf-pad
    return out[..., :S].reshape(B, Hk, S)


def snapkv_keep(q, k, q_pos, k_pos, scale, budget_: int, window: int, kernel: int, pool: str, key_bias=None):
    """Prefill selection (left padding dropped), or None at a decode step (nothing is evicted)."""
    T, S = q.shape[2], k.shape[2]
    if S != T:
        return None
    n = (q_pos >= 0).sum(dim=1)  # real prompt tokens per row
    if int(n.max()) <= budget_:
        return k_pos >= 0
    w = min(window, T)
    # the observation window: the last w query rows (left padding sits at the front, so they are real)
    # SnapKV sums the window rows; colsum's mean over g only rescales, which top-k ignores
    obs = colsum(q, k, q_pos, k_pos, scale, key_bias, rows=(T - w, T))
    valid = k_pos >= 0
    start = (n - w)[:, None, None]  # first window position per row
    prefix = valid & (k_pos < start)
    pooled = pool1d(obs.masked_fill(~prefix, 0.0), kernel, pool)
    chosen = topk_mask(pooled, prefix, torch.full_like(n, budget_ - w))
    keep = chosen | (valid & (k_pos >= start))
    fits = (n <= budget_)[:, None, None]
    return torch.where(fits, valid, keep)


def snapkv_reference(q, k, v, q_pos, k_pos, scale, budget_, window, kernel, pool, key_bias=None):
    """-> (k, v, k_pos): compressed after prefill, appended unchanged during decode."""
    keep = snapkv_keep(q, k, q_pos, k_pos, scale, budget_, window, kernel, pool, key_bias)
    if keep is None:
        return k, v, k_pos
    return compact(keep, k, v, k_pos)


# ----------------------------------------------------------------------------------- StreamingLLM
def streaming_keep(k_pos, length, sinks: int, window: int) -> torch.Tensor:
    """First ``sinks`` positions plus the last ``window`` positions of each row."""
    return (k_pos >= 0) & ((k_pos < sinks) | (k_pos >= length[:, None, None] - window))


def streaming_reference(k, v, q_pos, k_pos, sinks, window):
    """-> (k, v, k_pos) keeping attention sinks and a recent window (keys stay pre-RoPE)."""
    return compact(streaming_keep(k_pos, row_length(q_pos), sinks, window), k, v, k_pos)
