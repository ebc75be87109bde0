"""Does the tuner's cheap proxy rank recipes as the held-out evaluation does? Rank correlations, ties handled.

A study ranks its trials by calibration scores (a few needles, one short perplexity window); the result that
counts is the held-out suite (e.g. 50 needle cases of another seed). ``spearman`` (Spearman's rho: Pearson's
correlation of average ranks, so tied values share their mean rank) and ``kendall_tau_b`` (Kendall's tau-b,
concordant minus discordant pairs over the tie-corrected pair count) measure how well one ordering predicts
the other; ``proxy_order`` pairs the recipes both sides hold. A handful of recipes gives a wide spread of
possible values: read them with n (there is no interval here; with n <= 6 a single swap moves rho by ~0.1-0.3).
scipy (``scipy.stats.spearmanr``/``kendalltau``) computes the same numbers but is not a dependency of
graphwright; the tests check these against hand-computed values and known identities (a monotone map gives 1,
a reversal -1, tau-b of a tie-free pair equals (C - D) / (n choose 2)).
"""

from __future__ import annotations

import math


def _check(x, y) -> tuple[list, list]:
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"rank correlation needs two equally long sequences of at least 2 values; got {len(x)} and {len(y)}")
    if any(v != v for v in x + y):
        raise ValueError("rank correlation values must not be NaN")
    return x, y


def average_ranks(values) -> list:
    """1-based ranks; tied values get the mean of the ranks they span ([10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rho of ``x`` and ``y`` (ties: average ranks); None when either side is constant (undefined)."""
    x, y = _check(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def kendall_tau_b(x, y) -> float | None:
    """Kendall's tau-b: (C - D) / sqrt((n0 - tx) (n0 - ty)); None when either side is constant."""
    x, y = _check(x, y)
    c = d = tx = ty = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                tx, ty = tx + 1, ty + 1
            elif dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                c += 1
            else:
                d += 1
    n0 = n * (n - 1) // 2
    den = math.sqrt((n0 - tx) * (n0 - ty))
    return None if den == 0 else (c - d) / den


def proxy_order(proxy: dict, heldout: dict) -> dict:
    """``{recipe: proxy score}`` and ``{recipe: held-out score}`` (higher = better on both) -> the paired correlations.

    Returns ``{"n", "recipes", "spearman", "kendall_tau_b"}`` over the recipes both hold (in ``proxy``'s order).
    """
    both = [r for r in proxy if r in heldout]
    if len(both) < 2:
        raise ValueError(f"proxy_order needs at least 2 recipes scored on both sides; got {len(both)} ({both})")
    x, y = [proxy[r] for r in both], [heldout[r] for r in both]
    return {"n": len(both), "recipes": both, "spearman": spearman(x, y), "kendall_tau_b": kendall_tau_b(x, y)}
