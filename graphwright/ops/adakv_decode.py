"""Head-adaptive (Ada-KV) budgets at every decode step for H2O and TOVA, on the packed per-layer cache.

Technique: Ada-KV (arXiv 2407.11550, ``ALGORITHMS-2.md`` §3) shares a layer's budget Hk*C across its
KV heads by score. The paper splits once, after prefill (``adakv_ref``); here the split is kept at
every step for the decode-time scorers (issue 18 item 4, issue 20 item 1):

* ``h2o``: H2O's cumulative attention (arXiv 2306.14048): each slot carries the attention it has
  received from its own head's queries (mean over the g query heads of the KV head), summed over
  every step so far; new slots start at 0;
* ``tova``: TOVA's last-query attention (arXiv 2401.06104), per KV head (mean over its g query heads)
  rather than TOVA's mean over all heads: a score shared by every head gives nothing to split.
  The state then holds the last step's score (not read back).

Every step (prefill included) and every row, with L the row's length: cap = budget_n +
floor(budget_f*L) + floor(window_f*L) tokens per head; sinks (positions < ``sinks``) and the recent
``window`` + floor(window_f*L) positions are always kept; C_h = cap - (head h's protected slots) is
head h's share of the evictable budget, and the layer keeps sum_h C_h evictable tokens:

1. floor: head h keeps its top f_h = min(n_h, round(floor * C_h)) candidates (n_h its candidates);
2. the rest of the layer budget, sum_h C_h - sum_h f_h, goes to the highest remaining candidates
   over all heads of the layer (one global top-k; ties: lower head, then earlier slot);
3. if the layer's candidates fit (sum_h n_h <= sum_h C_h) nothing is dropped.

So once the layer is full each decode step, which adds one token per head, drops the Hk lowest
scoring tokens among all its heads except what a head's floor protects. The floor is kvpress
``AdaKVPress``'s form (force each head's top alpha share, then a global top-k of the rest) rather
than the paper's safeguard n_h <- round((1 - alpha) n_h + alpha C) of the prefill path: the safeguard
re-rounded at every step would let the layer's total drift by up to Hk per step; this one keeps it
exact. Both give alpha = 1 => every head keeps its own top-C_h (the uniform per-head policy;
``evict(score='h2o', when='decode')`` for h2o: asserted in ``tests/passes/test_adakv_decode.py``)
and alpha = 0 => the layer's global top-k. Exact setting: a budget >= the row's length (identity).

Packed layout (``adakv_ref``): k, v [B, 1, N, D], k_pos [B, Hk, N] (a slot's position in its owner
head's row, -1 elsewhere), per-slot score [B, 1, N] fp32. Attention scores for the per-slot score
are computed against the buffer expanded to Hk heads, each head masked to its own slots; at
prefill (the cache was empty) on the dense [B, Hk, T] view of the same slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adakv_ref import compact_packed, unpack_prefill
from .eviction_policy import EVICT_OPS, REFERENCES
from .eviction_ref import budget, colsum, row_length, topk_mask

DECODE_SCORERS = ("h2o", "tova")


def step_scores(q, k, q_pos, k_pos, scale, scorer: str) -> Tensor:
    """[B, 1, N] fp32: this step's attention each packed slot received from its own head's queries
    (h2o: summed over the step's query rows; tova: the last row), mean over the g query heads."""
    B, hk, N = k_pos.shape
    T = q.shape[2]
    rows = (T - 1, T) if scorer == "tova" else None
    if N == hk * T and T > 1:  # prefill on an empty cache: the dense per-head view (same values, Hk x fewer keys)
        kd, kpd = unpack_prefill(k, k_pos, T)
        return colsum(q, kd, q_pos, kpd, scale, rows=rows).reshape(B, 1, hk * T)
    s = colsum(q, k.expand(-1, hk, -1, -1), q_pos, k_pos, scale, rows=rows)  # [B, Hk, N], 0 off a head's own slots
    return s.masked_fill(k_pos < 0, 0.0).sum(dim=1, keepdim=True)


def adaptive_decode_keep(score: Tensor, k_pos: Tensor, length: Tensor, budget_n: int, budget_f: float, sinks: int,
                         window: int, window_f: float, floor: float) -> Tensor:
    """[B, Hk, N] bool keep set (slot j kept for its owner head); score [B, 1, N] or [B, Hk, N]."""
    valid = k_pos >= 0
    s = score.float().expand(k_pos.shape)
    win_f = budget(0, window_f, length)
    cap = budget(budget_n, budget_f, length) + win_f  # [B]
    L = length[:, None, None]
    protected = valid & ((k_pos < sinks) | (k_pos >= L - window - win_f[:, None, None]))
    cand = valid & ~protected
    c = (cap[:, None] - protected.sum(-1)).clamp(min=0)  # [B, Hk] each head's share of the evictable budget
    n = cand.sum(-1)
    keep = valid.clone()
    for b in range(k_pos.shape[0]):
        total = int(c[b].sum())
        if int(n[b].sum()) <= total:
            continue
        f = torch.minimum(torch.floor(floor * c[b].double() + 0.5).long(), n[b])
        forced = topk_mask(s[b:b + 1], cand[b:b + 1], f[None])[0]
        rest = total - int(forced.sum())
        free = cand[b] & ~forced
        flat = s[b].masked_fill(~free, float("-inf")).reshape(-1)
        order = torch.sort(flat, descending=True, stable=True).indices[:rest]
        extra = torch.zeros_like(flat, dtype=torch.bool)
        extra[order] = True
        keep[b] = protected[b] | forced | (extra.view_as(free) & free)
    return keep


def adakv_decode_reference(q, k, v, q_pos, k_pos, score, scale, scorer, budget_n, budget_f, floor, sinks, window,
                           window_f):
    """-> (k, v, k_pos, score) packed: accumulate (h2o) or replace (tova) the per-slot score, then evict."""
    if scorer not in DECODE_SCORERS:
        raise ValueError(f"evict_adakv_decode: scorer={scorer!r}; allowed: {', '.join(DECODE_SCORERS)}")
    B, _, N = k_pos.shape
    now = step_scores(q, k, q_pos, k_pos, scale, scorer)
    if scorer == "h2o":
        score = torch.cat([score.float(), score.new_zeros(B, 1, N - score.shape[2])], dim=2) + now
    else:
        score = now
    keep = adaptive_decode_keep(score, k_pos, row_length(q_pos), budget_n, budget_f, sinks, window, window_f, floor)
    keep_flat = (keep & (k_pos >= 0)).any(dim=1)
    if bool((keep_flat | ~(k_pos >= 0).any(dim=1)).all()):  # every held slot kept: nothing to compact
        return k, v, k_pos, score
    return compact_packed(keep_flat, k, v, k_pos, (score,))


@torch.library.custom_op("graphwright::evict_adakv_decode", mutates_args=())
def evict_adakv_decode(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, score: Tensor, scale: float,
                       scorer: str, budget_n: int, budget_f: float, floor: float, sinks: int, window: int,
                       window_f: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ada-KV budgets re-split at every step over H2O / per-head TOVA scores, on packed slots."""
    outs = adakv_decode_reference(q, k, v, q_pos, k_pos, score, scale, scorer, budget_n, budget_f, floor, sinks,
                                  window, window_f)
    ids = {id(k), id(v), id(k_pos), id(score)}
    return tuple(o.clone() if id(o) in ids else o for o in outs)


@evict_adakv_decode.register_fake
def _(q, k, v, q_pos, k_pos, score, scale, scorer, budget_n, budget_f, floor, sinks, window, window_f):
    n = torch.library.get_ctx().new_dynamic_size()
    B = k.shape[0]
    return (k.new_empty(B, 1, n, k.shape[-1]), v.new_empty(B, 1, n, v.shape[-1]), k_pos.new_empty(B, k_pos.shape[1], n),
            score.new_empty(B, 1, n, dtype=torch.float32))


EVICT_ADAKV_DECODE = torch.ops.graphwright.evict_adakv_decode.default
EVICT_OPS.append(EVICT_ADAKV_DECODE)
REFERENCES[EVICT_ADAKV_DECODE] = adakv_decode_reference
