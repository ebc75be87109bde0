"""Knorm (arXiv 2406.11430, kvpress ``knorm_press.py``): keep the keys with the lowest L2 norm.

Rule: s[b, hk, j] = -||k[b, hk, j, :]||_2 (fp32). No queries, so it works with any attention kernel.
RoPE rotates pairs of channels, so the norm (and the kept set) is the same for pre- and post-RoPE
keys (tested). Exact setting: budget >= length (kvpress: ratio 0). Default: after prefill.
"""

from __future__ import annotations

from .base import ScoreInputs, Scorer


def knorm_score(x: ScoreInputs):
    return -x.k.float().norm(dim=-1)


KNORM = Scorer("knorm", knorm_score, "arXiv 2406.11430", "-||k||_2 (lowest key norm kept)", "budget >= length",
               needs_q=False)
