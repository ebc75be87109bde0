"""Knorm (arXiv 2406.11430, kvpress ``knorm_press.py``): keep the keys with the lowest L2 norm.

Rule: s[b, hk, j] = -||k[b, hk, j, :]||_2 (fp32). No queries, so it works with any attention kernel.
RoPE rotates pairs of channels, so the norm (and the kept set) is the same for pre- and post-RoPE
keys (tested). Candidates whose norms differ by at most 1e-5 relative (a repeated token at layer 0:
equal in exact arithmetic, apart by rounding that differs per backend) are tied and the top-k's
position tie-break decides (``near_ties.py``). Exact setting: budget >= length (kvpress: ratio 0).
Default: after prefill.
"""

from __future__ import annotations

from .base import ScoreInputs, Scorer
from .near_ties import snap_near_ties


def knorm_score(x: ScoreInputs):
    return snap_near_ties(-x.k.float().norm(dim=-1), x.cand)


KNORM = Scorer("knorm", knorm_score, "arXiv 2406.11430", "-||k||_2 (lowest key norm kept)", "budget >= length",
               needs_q=False)
