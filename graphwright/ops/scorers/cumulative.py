"""Cumulative attention (H2O heavy hitters, arXiv 2306.14048).

Rule: each cached key's score is the attention it has received, summed over every query so far
(prompt rows at prefill, one row per decode step), mean over the g query heads of its KV head.
The generic op accumulates this running score at every step (evicting or not, state
``attn_score<layer>``); this scorer returns it. Exact setting: budget >= length.
Invariant tested: ``evict(score="h2o", when="decode", budget=H+R, window=R)`` keeps exactly
``h2o(heavy=H, recent=R)``'s sets over a decode; a loop oracle.
"""

from __future__ import annotations

from .base import ScoreInputs, Scorer


def cumulative_score(x: ScoreInputs):
    return x.state


H2O = Scorer("h2o", cumulative_score, "arXiv 2306.14048", "cumulative attention received", "budget >= length",
             default_when="decode", stateful=True)
