"""Seeded percentile-bootstrap 95% intervals for per-case scores, alone and paired with dense.

Every suite metric is a mean over cases (needle found 0/1, RULER string_match_all fraction, a
window's mean NLL), so its uncertainty is the case-resampling bootstrap: draw ``n_resamples``
sets of case indices with replacement from ``numpy.random.default_rng(seed)``, recompute the
statistic on each and take the 2.5th / 97.5th percentiles (percentile method; scipy is not a
dependency of graphwright, and for means of bounded scores the percentile interval is what
``scipy.stats.bootstrap(method="percentile")`` computes). Paired comparisons resample the *same*
case indices on both sides, so a method compared with itself has the interval [0, 0] exactly,
and the interval of a difference reflects per-case agreement, not two independent spreads.
"""

from __future__ import annotations

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def _indices(n: int, seed: int, n_resamples: int) -> np.ndarray:
    if n < 1:
        raise ValueError("a bootstrap needs at least one case")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(samples: np.ndarray, confidence: float) -> tuple:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_mean(values, seed: int = 0, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "lo", "hi", "n"}``: the mean of ``values`` and its percentile-bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    idx = _indices(x.size, seed, n_resamples)
    lo, hi = _interval(x[idx].mean(axis=1), confidence)
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": int(x.size)}


def paired_difference(base, other, seed: int = 0, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """``mean(other - base)`` over the same cases with its paired bootstrap interval."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same cases on both sides; got {a.shape} and {b.shape}")
    return bootstrap_mean(b - a, seed, n_resamples, confidence)


def perplexity_interval(nll, seed: int = 0, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """``{"ppl", "lo", "hi", "n"}`` from per-window mean NLLs: exp(mean NLL), windows resampled."""
    r = bootstrap_mean(nll, seed, n_resamples, confidence)
    return {"ppl": float(np.exp(r["mean"])), "lo": float(np.exp(r["lo"])), "hi": float(np.exp(r["hi"])), "n": r["n"]}


def paired_ppl_ratio(base_nll, other_nll, seed: int = 0, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """Relative perplexity change ``ppl_other / ppl_base - 1`` over the same windows, paired interval.

    With equal-length windows exp(mean NLL) is the perplexity, so the ratio is exp(mean(other - base))."""
    d = paired_difference(base_nll, other_nll, seed, n_resamples, confidence)
    return {"ratio_minus_1": float(np.expm1(d["mean"])), "lo": float(np.expm1(d["lo"])), "hi": float(np.expm1(d["hi"])), "n": d["n"]}
