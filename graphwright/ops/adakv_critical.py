"""CriticalAdaKV: CriticalKV's two-stage selection with Ada-KV head budgets, as NVIDIA kvpress ``CriticalAdaKVPress``.

Techniques: CriticalKV (arXiv 2502.03805, ``scorers/criticalkv.py``) with Ada-KV (arXiv 2407.11550) budgets,
the combination the CriticalKV paper calls CriticalAdaKV. Runs once after prefill on the packed per-layer cache
(``adakv_ref``), per row:

1. base score a: SnapKV's window attention averaged over the window (``criticalkv.py``); the protected tokens
   (sinks and the recent window, kvpress: the window, scored max + 1) rank above every evictable one;
2. head budgets n_h (protected tokens included): **kvpress's split** (``adakv_ref.kvpress_counts``, not the
   official safeguard ``round((1 - floor) n_h + floor C)``): every head keeps n_kept = budget tokens on average;
   its top n_safe = int(floor * n_kept) (at least 1 when floor > 0) by a are forced, then the layer's remaining
   Hk * n_kept slots go to the global top of the other tokens by a;
3. stage 1 (kvpress's first-stage rule, per head): the top max(n_safe, int(first * n_h)) tokens by a are kept
   (protected ones counted among them);
4. stage 2: the rest of n_h goes to the top of the other evictable tokens by (a + eps) * mean over the KV head's
   g query heads of ||v_j W_O,h^T||_1 (``criticalkv.value_output_norm``).
Ties go to the earlier slot. kvpress builds the same sets by masking (its final global bottom-k removes exactly
the tokens outside each head's top n_h); here the kept slots are packed (``compact_packed``): a layer holds
sum_h n_h slots, real per-head memory. kvpress forces its window only through n_safe / stage 1; graphwright always
keeps sinks + window, so the two agree whenever n_safe >= sinks + window (at 25% of 1,024 tokens: 51 >= 32).

Exact setting: budget >= the row's length keeps everything (identity). ``first = 1`` keeps Ada-KV's SnapKV sets
with kvpress's split (``snapkv(heads='adaptive', split='kvpress')``). Invariants tested
(``tests/ops/test_adakv_critical.py``): per-head kept sets equal a loop oracle on random attention, values and
o_proj weights; ``first = 1`` equals kvpress-split Ada-KV SnapKV; budget >= length is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adakv_ref import kvpress_counts
from .eviction_ref import topk_mask
from .scorers.base import ScoreInputs
from .scorers.criticalkv import value_output_norm
from .scorers.snapkv import snapkv_score


def first_stage_counts(n_total: Tensor, n_prot: int, n_kept: int, floor: float, first: float) -> Tensor:
    """[Hk] evictable tokens chosen by the base score alone: max(n_safe, int(first * n_h)) minus the protected ones."""
    n_safe = int(n_kept * floor)
    if floor > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    stage1 = torch.floor(n_total.double() * first).long().clamp(min=n_safe)
    return (stage1 - n_prot).clamp(min=0)


def critical_adaptive_keep(x: ScoreInputs, cap: Tensor, protected: Tensor, floor: float) -> Tensor:
    """[B, Hk, S] bool keep set on the dense prefill layout; ``cap`` [B] tokens per head on average (protected
    included), ``protected`` [B, Hk, S] the always-kept sinks and window, ``x.cand`` the evictable slots."""
    if x.wo is None:
        raise ValueError("criticalkv with rule='adaptive': needs the layer's o_proj weight (wo)")
    w = min(max(x.window, 1), x.q.shape[2])
    base = snapkv_score(x).float() / w
    second = (base + x.eps) * value_output_norm(x.v, x.wo)
    keep = (x.k_pos >= 0).clone()
    for b in range(x.k.shape[0]):
        n_kept = int(cap[b])
        if int(x.length[b]) <= n_kept:
            continue
        n_prot = int(protected[b, 0].sum())
        c = max(0, n_kept - n_prot)
        counts = torch.tensor(kvpress_counts(base[b], x.cand[b], c, floor, n_prot), device=x.k.device)  # [Hk] prefix
        m = torch.minimum(first_stage_counts(counts + n_prot, n_prot, n_kept, floor, x.first), counts)
        cb = x.cand[b:b + 1]
        stage1 = topk_mask(base[b:b + 1], cb, m[None])
        stage2 = topk_mask(second[b:b + 1], cb & ~stage1, (counts - m)[None])
        keep[b] = (stage1 | stage2)[0] | protected[b]
    return keep


def describe(floor: float, first: float) -> str:
    return (f"CriticalAdaKV (arXiv 2502.03805 + 2407.11550): kvpress's Ada-KV split (floor {floor}), stage 1 "
            f"max(n_safe, int({first} n_h)) by window attention, the rest by (a + eps) ||v W_O||_1")

