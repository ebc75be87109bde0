"""Ada-KV head-adaptive budgets for any prefill scorer, on the packed per-layer cache.

Technique: Ada-KV (arXiv 2407.11550, ``ALGORITHMS-2.md`` §3). The layer keeps Hk*C evictable
tokens in total (C = the head budget minus the always-kept sinks and recent window); the global
top-(Hk*C) of the heads' scores decides how many each head gets (n_h), the safeguard
n_h <- round((1 - floor) * n_h + floor * C) keeps a floor, and each head keeps its own top-n_h
(or, with ``chunk``, its top n_h // chunk chunks, ChunkKV) plus sinks and window. Runs once after
prefill; decode appends. The scores come from any per-head scorer of ``ops/scorers`` (not the
shared TOVA, not the stateful cumulative score: ``passes/evict.py`` refuses those). CriticalKV (``wo``, the
layer's o_proj weight, and ``first``) runs its own rule, kvpress's CriticalAdaKV (``adakv_critical.py``).

Normalisation before the global top-k (scores must be comparable across heads):
* attention scorers (``needs_q``: snapkv, expected_attention, chunkkv's snapkv base) are used raw,
  as the paper and kvpress ``AdaKVPress`` do: every head's window attention is a softmax over the
  same keys, so its mass is already on one scale;
* key-only scorers (knorm, keydiff) are min-max scaled to [0, 1] per head over its candidates.
  Their raw values (-||k||, -cos) carry each head's key scale, so a raw global top-k would give the
  whole budget to the head with the smallest keys; after min-max every head's best token scores 1
  and the split follows how many tokens sit near the head's best (dispersed heads get more, as
  with attention). A head whose candidates all score the same maps to 1.

Head-score shares (``rule='scores'``, ``weights`` given; the budget rule of ``snapkv(heads='scores')``,
``ops/head_shares.py``, over any per-head scorer): head h of this layer keeps b_h tokens, sinks and window
included, where (b_h) over every evicted (layer, KV head) is ``head_shares(weights, len(weights) * budget, n,
max(p, round(floor * budget)))`` (``head_shares.layer_counts``) -- the model's total budget spread in proportion to fixed per-head weights (the
head set's retrieval scores, ``(score + eps)^gamma``), each head capped at the row's length n and at least the p
protected tokens or ``floor`` of the budget; ``slot`` is this layer's index among the evicted layers. Each head
then keeps its top-(b_h - p) candidates by the scorer (normalised as above: a per-head monotone map, so the
kept set is the raw score's top-k). The weights are fixed, not read from this prompt's scores: they say which
heads retrieve, and the scorer says which tokens.

Exact settings: budget >= the row's length keeps everything (identity); floor = 1 gives every head
C (uniform); equal weights (gamma = 0) give every head the budget: ``rule='fixed'``'s per-head kept sets.
Packed layout and ``compact_packed``: ``adakv_ref``. Invariant tested
(``tests/ops/test_adakv_scored.py``): per-head counts and kept sets equal a slow loop oracle for
knorm, keydiff, expected_attention, snapkv and chunkkv; with snapkv the kept sets equal
``adakv_ref.adakv_keep`` (``snapkv(heads='adaptive')``); with ``weights``, the kept counts are the share table
and the kept sets each head's top-(b_h - p) (``tests/ops/test_adakv_scored_shares.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .adakv_critical import critical_adaptive_keep
from .adakv_ref import adaptive_counts, compact_packed, packed_fake, unpack_prefill
from .eviction_policy import EVICT_OPS, REFERENCES
from .eviction_ref import budget as row_budget
from .eviction_ref import row_length, topk_mask
from .head_shares import check_slot, layer_counts
from .scorers import SCORERS, ScoreInputs
from .scorers.chunkkv import chunk_keep


def normalise(score: Tensor, cand: Tensor, scorer: str) -> Tensor:
    """[B, Hk, S] scores comparable across heads (see the module docstring)."""
    s = score.float()
    if SCORERS[scorer].needs_q:
        return s
    lo = s.masked_fill(~cand, float("inf")).amin(dim=-1, keepdim=True)
    hi = s.masked_fill(~cand, float("-inf")).amax(dim=-1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (s - lo) / span.clamp(min=1e-30), torch.ones_like(s))
    return out.masked_fill(~cand, 0.0)


def adaptive_scored_keep(x: ScoreInputs, scorer: str, budget_n: int, budget_f: float, floor: float, chunk: int,
                         chunk_heads: str, weights=None, slot: int = 0) -> Tensor:
    """[B, Hk, S] bool keep set on the dense prefill layout (``x.k`` [B, Hk, S, D]); ``weights``: head-score shares
    (``rule='scores'``) instead of Ada-KV's split."""
    if weights:
        check_slot("evict_adakv_scored", weights, slot, x.k.shape[1])
    valid = x.k_pos >= 0
    L = x.length[:, None, None]
    protected = valid & ((x.k_pos < x.sinks) | (x.k_pos >= L - x.window))
    x.cand = valid & ~protected
    cap = row_budget(budget_n, budget_f, x.length)
    if SCORERS[scorer].needs_wo and not weights:  # CriticalAdaKV: its own two-stage rule (``adakv_critical.py``)
        return critical_adaptive_keep(x, cap, protected, floor)
    score = normalise(SCORERS[scorer].fn(x), x.cand, scorer)
    keep = valid.clone()
    for b in range(x.k.shape[0]):
        if int(x.length[b]) <= int(cap[b]):
            continue
        p = int(protected[b, 0].sum())
        c = max(0, int(cap[b]) - p)
        if weights:
            n_counts = layer_counts(weights, slot, x.k.shape[1], int(cap[b]), int(x.length[b]), p, round(floor * int(cap[b])))
        else:
            n_counts = adaptive_counts(score[b], x.cand[b], c, floor)
        counts = torch.tensor(n_counts, device=x.k.device)[None]
        cb = x.cand[b:b + 1]
        if chunk > 0:
            fits = (counts >= cb.sum(-1))[..., None]
            chosen = torch.where(fits, cb, chunk_keep(score[b:b + 1], cb, x.k_pos[b:b + 1], counts, chunk,
                                                      chunk_heads == "sum"))
        else:
            chosen = topk_mask(score[b:b + 1], cb, counts)
        keep[b] = chosen[0] | protected[b]
    return keep


def adakv_scored_reference(q, k, v, q_pos, k_pos, inv_freq, scale, scorer, budget_n, budget_f, floor, sinks, window,
                           kernel, smooth, pool, chunk, chunk_heads, n_future, eps, rope_scaling, layer, num_layers, wo=None,
                           first=0.5, weights=None, slot=0):
    """-> (k, v, k_pos) packed: compressed once after prefill (the cache was empty), appended at decode."""
    T = q.shape[2]
    hk = k_pos.shape[1]
    if k.shape[2] != hk * T:  # decode, or a prompt over a non-empty cache: append only
        return k, v, k_pos
    kd, kpd = unpack_prefill(k, k_pos, T)
    vd, _ = unpack_prefill(v, k_pos, T)
    x = ScoreInputs(q=q, k=kd, v=vd, q_pos=q_pos, k_pos=kpd, scale=scale, cand=kpd >= 0, length=row_length(q_pos),
                    inv_freq=inv_freq, rope_scaling=rope_scaling, window=window, kernel=kernel, smooth=smooth, pool=pool,
                    sinks=sinks, n_future=n_future, eps=eps, wo=wo, first=first)
    keep = adaptive_scored_keep(x, scorer, budget_n, budget_f, floor, chunk, chunk_heads, weights, slot)
    return compact_packed(keep.reshape(keep.shape[0], hk * T), k, v, k_pos)


@torch.library.custom_op("graphwright::evict_adakv_scored", mutates_args=())
def evict_adakv_scored(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, inv_freq: Optional[Tensor],
                       scale: float, scorer: str, budget_n: int, budget_f: float, floor: float, sinks: int, window: int,
                       kernel: int, smooth: str, pool: str, chunk: int, chunk_heads: str, n_future: int, eps: float,
                       rope_scaling: float, layer: int, num_layers: int, wo: Optional[Tensor],
                       first: float, weights: Optional[list[float]] = None, slot: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Ada-KV budgets (or head-score shares, ``weights``) for a scorer of ``ops/scorers`` on packed slots: once after
    prefill; decode appends."""
    outs = adakv_scored_reference(q, k, v, q_pos, k_pos, inv_freq, scale, scorer, budget_n, budget_f, floor, sinks,
                                  window, kernel, smooth, pool, chunk, chunk_heads, n_future, eps, rope_scaling, layer,
                                  num_layers, wo, first, weights, slot)
    ids = {id(k), id(v), id(k_pos)}
    return tuple(o.clone() if id(o) in ids else o for o in outs)


@evict_adakv_scored.register_fake
def _(q, k, v, q_pos, k_pos, inv_freq, scale, scorer, budget_n, budget_f, floor, sinks, window, kernel, smooth, pool,
      chunk, chunk_heads, n_future, eps, rope_scaling, layer, num_layers, wo, first, weights=None, slot=0):
    return packed_fake(k, v, k_pos)


EVICT_ADAKV_SCORED = torch.ops.graphwright.evict_adakv_scored.default
EVICT_OPS.append(EVICT_ADAKV_SCORED)
REFERENCES[EVICT_ADAKV_SCORED] = adakv_scored_reference
