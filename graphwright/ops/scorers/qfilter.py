"""Q-Filters (arXiv 2503.02812, kvpress ``qfilter_press.py``): score keys by one fixed direction per KV head.

Rule: s[b, hk, j] = -<f[layer, hk], k[b, hk, j]> (fp32; k post-RoPE as cached), f the layer's filter
for that KV head, read from the op's ``qfilter`` input [Hk, D] (a constant the pass puts in the graph).
The filters follow kvpress's convention (the negated projection is kept), so kvpress's hub filters and
ours are interchangeable: f = -u with u the principal right singular vector of the head's calibration
queries, oriented so that their mean projection on u is positive; then -<f, k> = <u, k> estimates the
attention k receives (E_q <q, k> ~ E<q, u> <u, k>). How the filters are made or loaded:
``passes/qfilter_calibrate.py``. No attention weights are needed. Exact setting: budget >= length.
Invariant tested: kept set equals a loop oracle (``tests/ops/test_scorer_qfilter.py``); the calibrated
filter equals an SVD computed in the test.
"""

from __future__ import annotations

from .base import ScoreInputs, Scorer


def qfilter_score(x: ScoreInputs):
    if x.qfilter is None:
        raise ValueError("qfilter scorer: no filters given (the op's qfilter input [Hk, D])")
    f = x.qfilter.float()
    if f.shape != (x.k.shape[1], x.k.shape[-1]):
        raise ValueError(f"qfilter scorer: filters of shape {tuple(f.shape)} for keys with {x.k.shape[1]} KV heads of "
                         f"dim {x.k.shape[-1]}; expected ({x.k.shape[1]}, {x.k.shape[-1]})")
    return -(x.k.float() * f[None, :, None, :]).sum(dim=-1)


QFILTER = Scorer("qfilter", qfilter_score, "arXiv 2503.02812", "-<f, k>: one calibrated direction per KV head",
                 "budget >= length", needs_q=False, filtered=True)
