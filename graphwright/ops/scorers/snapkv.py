"""SnapKV scorer (arXiv 2404.14469): attention mass from an observation window of prompt queries.

Rule: the last ``window`` query rows of the prompt (causal inside the window) vote: softmax rows
summed over the window, reduced over the g query heads of a KV head (``pool``: mean, as SnapKV's
reference, or max), restricted to the evictable keys, then smoothed along the sequence with a 1-D
pooling of width ``kernel`` (``smooth`` avg or max, stride 1, zero padding kernel//2).
Exact setting: budget >= prompt length. Prefill only (a decode step has a single query).
Invariant tested: ``evict(score="snapkv", when="prefill", budget=B)`` keeps exactly
``snapkv(budget=B)``'s sets (``tests/passes/test_evict_scorers.py``), and a loop oracle.
"""

from __future__ import annotations

from ..eviction_ref import pool1d
from .base import ScoreInputs, Scorer, attention_rows, gqa_reduce


def snapkv_score(x: ScoreInputs):
    T = x.q.shape[2]
    w = min(max(x.window, 1), T)
    obs = gqa_reduce(attention_rows(x, (T - w, T)), x.pool)
    return pool1d(obs.masked_fill(~x.cand, 0.0), x.kernel, x.smooth)


SNAPKV = Scorer("snapkv", snapkv_score, "arXiv 2404.14469", "window attention mass, pooled", "budget >= prompt length",
                prefill_only=True, gqa_pool=True, smoothing=True)
