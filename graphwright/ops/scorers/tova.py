"""TOVA (arXiv 2401.06104, ``TOVACache.reduce``): the last query's attention, averaged over all heads.

Rule: a[b, j] = mean over all H query heads of softmax(q_last k^T * scale)[j] (the step's last
query row, its own key included); the same score, hence the same kept set, for every KV head of the
layer (``shared``). Default schedule: after prefill and at every decode step (one drop per step
once full). Exact setting: budget >= prompt + new tokens.
"""

from __future__ import annotations

from .base import ScoreInputs, Scorer, attention_rows


def tova_score(x: ScoreInputs):
    T = x.q.shape[2]
    a = attention_rows(x, (T - 1, T)).mean(dim=2)  # [B, Hk, S]: mean over the g heads of each KV head
    return a.mean(dim=1, keepdim=True).expand_as(a)  # equal groups: mean over all H query heads


TOVA = Scorer("tova", tova_score, "arXiv 2401.06104", "last query's attention, mean over all heads (shared)",
              "budget >= prompt + new tokens", default_when="decode", shared=True)
