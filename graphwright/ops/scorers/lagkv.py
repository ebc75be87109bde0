"""LagKV (arXiv 2504.04704, kvpress ``lagkv_press.py``): score each partition by the next one's statistics.

Rule, per row and KV head, over the cached tokens in position order (n of them, ``sinks`` = the paper's
n_sink, ``lag`` = its partition size): if n < sinks + 2 * lag nothing is scored lag-relatively: sinks
score 1 and the other tokens (i - sinks) / (n - sinks), so a budget keeps the sinks and the most recent
tokens. Otherwise the tokens after the sinks are cut into m = (n - sinks) // lag partitions of ``lag``
tokens; partition i < m - 1 is min-max normalised per channel by the min and max of partition i + 1
(``(x - min) / (max - min)``, keys and values apart), each token's std over channels (unbiased) is
softmaxed over the partition, and the key and value results are averaged. The score is the token's
rank within its partition divided by lag (stable ascending ranks: kvpress's ``argsort().argsort()``),
so every partition gives up the same number of tokens up to ties across partitions, which the op's
top-k breaks by position (earliest kept). The last full partition and the partial tail after it (and
the sinks) score 1, above every rank: always kept. kvpress's ``cross_scoring`` (experimental: the raw
softmax instead of ranks) is not offered.

No queries: keys and values only. Runs once after prefill (``evict`` refuses other schedules: the
partitions are the prompt's, and after an eviction the cache no longer holds whole partitions). On latent (``lowrank_kv``)
layers the op's values are one shared latent payload per token, so the value half is that payload's
statistic, the same for every head. Exact setting: budget >= length (kvpress: ratio 0).
Invariant tested: kept set equals a token-by-token loop oracle on random keys and values
(``tests/ops/test_scorer_lagkv.py``), and the score equals kvpress's on the same tensors when kvpress is present.
"""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer

DEFAULT_LAG = 128  # kvpress LagKVPress lag_size
DEFAULT_SINKS = 4  # kvpress LagKVPress n_sink


def _lag_states(x: torch.Tensor, sinks: int, end: int, lag: int) -> torch.Tensor:
    """[H, m - 1, lag]: per partition, softmax over its tokens of the std over channels after min-max by the next."""
    H, _, D = x.shape
    p = x[:, sinks:end].float().reshape(H, -1, lag, D)
    ref, cur = p[:, 1:], p[:, :-1]
    lo, hi = ref.amin(dim=2, keepdim=True), ref.amax(dim=2, keepdim=True)
    return ((cur - lo) / (hi - lo)).std(dim=-1).softmax(dim=-1)


def lag_scores(k: torch.Tensor, v: torch.Tensor, sinks: int, lag: int) -> torch.Tensor:
    """[H, n] fp32 LagKV scores of keys k [H, n, D] and values v [H or 1, n, Dv] in position order."""
    H, n, _ = k.shape
    out = torch.ones(H, n, device=k.device)
    if n < sinks + 2 * lag:
        if n > sinks:
            out[:, sinks:] = torch.arange(n - sinks, dtype=torch.float32, device=k.device) / (n - sinks)
        return out
    end = sinks + ((n - sinks) // lag) * lag
    s = (_lag_states(k, sinks, end, lag) + _lag_states(v, sinks, end, lag)) / 2  # [H, m - 1, lag]
    rank = s.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).float() / lag
    out[:, sinks:end - lag] = rank.reshape(H, -1)
    return out


def lagkv_score(x: ScoreInputs):
    B, Hk, S, _ = x.k.shape
    out = torch.zeros(B, Hk, S, device=x.k.device)
    for b in range(B):
        for h in range(Hk):
            slots = (x.k_pos[b, h] >= 0).nonzero().flatten()
            slots = slots[x.k_pos[b, h, slots].argsort(stable=True)]
            vh = h if x.v.shape[1] == Hk else 0  # a latent layer's shared payload has one row per token
            out[b, h, slots] = lag_scores(x.k[b, h, slots][None], x.v[b, vh, slots][None], x.sinks, x.lag)[0]
    return out


LAGKV = Scorer("lagkv", lagkv_score, "arXiv 2504.04704",
               "rank within its lag partition of the std of keys and values min-max normalised by the next partition",
               "budget >= length", needs_q=False, default_sinks=DEFAULT_SINKS, lagged=True)
