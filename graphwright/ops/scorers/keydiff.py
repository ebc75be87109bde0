"""KeyDiff (arXiv 2504.15364, kvpress ``keydiff_press.py``): keep the keys least like the mean direction.

Rule: per KV head the anchor is a = mean over the cached keys of k_j / ||k_j|| (valid slots only);
s_j = -cos(k_j, a). No queries. Exact setting: budget >= length. The paper evicts after every
prefill block of N tokens; graphwright prefills the prompt in one step, so the block schedule is
approximated by ``when="overflow"`` / ``every`` during decode (one-shot scoring after prefill by
default).
"""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


def keydiff_score(x: ScoreInputs):
    k = x.k.float()
    valid = (x.k_pos >= 0)[..., None]
    unit = torch.nn.functional.normalize(k, dim=-1) * valid
    anchor = unit.sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp(min=1)
    return -torch.nn.functional.cosine_similarity(k, anchor.expand_as(k), dim=-1)


KEYDIFF = Scorer("keydiff", keydiff_score, "arXiv 2504.15364", "-cos(k, mean unit key)", "budget >= length",
                 needs_q=False)
