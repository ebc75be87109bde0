"""Per-head budget shares from head scores: water-filling of a total token budget over (layer, KV head) pairs.

Used by ``snapkv(heads="scores")`` (``passes/snapkv.py``, op ``ops/adakv_shares.py``) and ``evict(rule="scores")``
(``passes/evict.py``, op ``ops/adakv_scored.py``), both through ``layer_counts``. Each head i has a
weight w_i = (s_i + eps)^gamma from its retrieval score s_i (a head set, arXiv 2404.15574); the total T
(= number of heads * budget) is split as x_i = clip(lam * w_i, floor, cap) with lam chosen so that
sum_i x_i = T (water-filling: a head capped at ``cap`` -- its prompt length -- passes its excess on to the
others in proportion to their weights; a head below ``floor`` is raised to it). T is first clamped to
[H * floor, H * cap]. Integers: every head gets floor(x_i) and the R = T - sum floor(x_i) heads with the
largest fractional parts one more (ties: lower index). Values within 1e-9 of an integer count as that integer,
so equal weights give exactly T / H each.

gamma = 0: every weight is 1, every head gets T / H (uniform SnapKV when T = H * budget); gamma -> inf: the
top-scored heads fill to ``cap`` first and the rest keep ``floor`` (DuoAttention's retrieval/streaming split).
Weights are computed relative to the largest one in log space (no overflow for large gamma) and clamped
at 1e-300 (a positive weight, so the total can always be placed).

Invariant tested (``tests/ops/test_head_shares.py``): equals a slow loop oracle (bisection on lam) on
random weights, floors and caps; sums to the clamped total; gamma = 0 is uniform.
"""

from __future__ import annotations

import functools
import math

TOL = 1e-9
MIN_WEIGHT = 1e-300


def share_weights(scores, gamma: float, eps: float) -> tuple[float, ...]:
    """(s_i + eps)^gamma / max_j (s_j + eps)^gamma for scores >= 0 (computed as exp(gamma * log ratio))."""
    if gamma < 0 or eps <= 0:
        raise ValueError(f"share weights need gamma >= 0 and eps > 0; got gamma={gamma!r}, eps={eps!r}")
    logs = [math.log(max(0.0, float(s)) + eps) for s in scores]
    top = max(logs)
    return tuple(max(MIN_WEIGHT, math.exp(gamma * (lg - top))) for lg in logs)


def _filled(lam: float, weights, floor: float, cap: float) -> float:
    return sum(min(cap, max(floor, lam * w)) for w in weights)


def check_slot(op: str, weights, slot: int, hk: int) -> None:
    """``weights`` must be whole layers of ``hk`` KV heads and ``slot`` one of those layers (ValueError naming ``op``)."""
    if len(weights) % hk or not 0 <= slot < len(weights) // hk:
        raise ValueError(f"{op}: {len(weights)} weights are not whole layers of {hk} KV heads holding slot {slot}")


def layer_counts(weights, slot: int, hk: int, budget: int, n: int, protected: int, floor: int) -> list:
    """Layer ``slot``'s Hk token counts beyond its ``protected`` (always kept) tokens, for a row of n tokens: the share
    table of the model's total budget len(weights) * ``budget``, each head at least max(protected, floor) tokens."""
    table = head_shares(tuple(float(w) for w in weights), len(weights) * budget, n, max(protected, floor))
    return [max(0, b - protected) for b in table[slot * hk:(slot + 1) * hk]]


@functools.lru_cache(maxsize=256)
def head_shares(weights: tuple[float, ...], total: int, cap: int, floor: int) -> tuple[int, ...]:
    """Integer tokens per head: clip(lam * w_i, floor, cap) summing to ``total`` (clamped), rounded as the module says."""
    h = len(weights)
    if h == 0 or any(not w > 0 for w in weights):
        raise ValueError("head_shares needs at least one head and positive weights")
    floor = max(0, min(int(floor), int(cap)))
    total = max(h * floor, min(int(total), h * int(cap)))
    # lam breakpoints: head i leaves the floor at floor / w_i and reaches the cap at cap / w_i; sum is piecewise linear
    points = sorted({floor / w for w in weights} | {cap / w for w in weights})
    lo = 0.0
    for p in points:
        if _filled(p, weights, floor, cap) >= total:
            hi = p
            break
        lo = p
    else:
        hi = lo
    f_lo, f_hi = _filled(lo, weights, floor, cap), _filled(hi, weights, floor, cap)
    lam = hi if f_hi <= f_lo else lo + (total - f_lo) * (hi - lo) / (f_hi - f_lo)
    x = [min(cap, max(floor, lam * w)) for w in weights]
    return round_shares(x, total)


def round_shares(x, total: int) -> tuple[int, ...]:
    """floor(x_i) (within TOL of the next integer counts as it), then +1 to the largest fractional parts."""
    base = [math.floor(v + TOL) for v in x]
    frac = [v - b if v - b > TOL else 0.0 for v, b in zip(x, base)]
    left = total - sum(base)
    order = sorted(range(len(x)), key=lambda i: (-frac[i], i))
    out = list(base)
    for i in order[:max(0, left)]:
        out[i] += 1
    return tuple(out)
