"""LagKV (arXiv 2504.04704) through the registered ``evict_scored_lag`` op against a token-by-token loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

from graphwright.ops.policy_scored import SCORED_LAG_POLICY
from graphwright.ops.scorers import SCORERS
from graphwright.ops.scorers.lagkv import lag_scores
from tests.ops.scorer_oracles import DEFAULTS, kept, prefill_step, select_oracle


def call_lag(q, k, v, q_pos, k_pos, lag, **params):
    args = dict(DEFAULTS, scorer="lagkv", when="prefill", **params)
    return SCORED_LAG_POLICY.op(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, scale=0.35, lag=lag, **args)


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _token_stats(rows, lag):
    """Per token of the scored partitions (python floats): softmax over its partition of the std over channels
    of its values min-max normalised, channel by channel, by the next partition's min and max."""
    D = len(rows[0])
    out = []
    for start in range(0, len(rows) - lag, lag):
        part, ref = rows[start:start + lag], rows[start + lag:start + 2 * lag]
        lo = [min(r[c] for r in ref) for c in range(D)]
        hi = [max(r[c] for r in ref) for c in range(D)]
        stds = [_std([(tok[c] - lo[c]) / (hi[c] - lo[c]) for c in range(D)]) for tok in part]
        z = sum(math.exp(s) for s in stds)
        out += [math.exp(s) / z for s in stds]
    return out


def lagkv_oracle(k, v, k_pos, sinks, lag):
    """[B][Hk][S] scores, written token by token from the paper's rule (module docstring of ``lagkv.py``)."""
    B, Hk, S, _ = k.shape
    out = []
    for b in range(B):
        rows = []
        for h in range(Hk):
            slots = sorted((s for s in range(S) if k_pos[b, h, s] >= 0), key=lambda s: int(k_pos[b, h, s]))
            n = len(slots)
            score = [0.0] * S
            if n < sinks + 2 * lag:
                for i, s in enumerate(slots):
                    score[s] = 1.0 if i < sinks else (i - sinks) / (n - sinks)
                rows.append(score)
                continue
            m = (n - sinks) // lag
            body = slots[sinks:sinks + m * lag]
            ks = _token_stats([[float(x) for x in k[b, h, s]] for s in body], lag)
            vs = _token_stats([[float(x) for x in v[b, h, s]] for s in body], lag)
            both = [(a + c) / 2 for a, c in zip(ks, vs)]
            for s in slots:
                score[s] = 1.0
            for p in range(m - 1):
                part = both[p * lag:(p + 1) * lag]
                for j in range(lag):
                    rank = sum(1 for i in range(lag) if part[i] < part[j] or (part[i] == part[j] and i < j))
                    score[body[p * lag + j]] = rank / lag
            rows.append(score)
        out.append(rows)
    return out


@pytest.mark.parametrize("T,lag,sinks,budget", [(27, 4, 2, 11), (27, 4, 2, 0.5), (30, 3, 4, 9), (21, 5, 0, 7),
                                                (12, 8, 4, 7)])  # the last: n < sinks + 2 lag, sinks + most recent
def test_lagkv_matches_the_loop_oracle(T, lag, sinks, budget):
    q, k, v, q_pos, k_pos = prefill_step(T=T, D=6, seed=T + lag)
    n, f = (budget, 0.0) if isinstance(budget, int) else (0, budget)
    out = call_lag(q, k, v, q_pos, k_pos, lag, budget_n=n, budget_f=f, sinks=sinks)
    want = select_oracle(lagkv_oracle(k, v, k_pos, sinks, lag), k_pos, q_pos, n, f, sinks, 0)
    assert kept(out[2]) == want
    assert kept(out[2]) != kept(k_pos)  # something was evicted


def test_lagkv_keeps_the_sinks_and_the_last_partitions():
    q, k, v, q_pos, k_pos = prefill_step(B=1, T=26, D=6, pad=(0,), seed=3)
    lag, sinks = 4, 2  # partitions 2-5, 6-9, 10-13, 14-17, 18-21, then 22-25: the last full one and the tail are kept
    out = call_lag(q, k, v, q_pos, k_pos, lag, budget_n=14, sinks=sinks)
    for h in kept(out[2])[0]:
        assert {0, 1, 22, 23, 24, 25} <= set(h) and len(h) == 14
        # 8 scored tokens of 20 kept: rank 3 of each of the 5 scored partitions, then rank 2 of the earliest 3 (ties)
        assert [len([x for x in h if p <= x < p + 4]) for p in range(2, 26, 4)] == [2, 2, 2, 1, 1, 4]


def test_lagkv_exact_setting_keeps_everything():
    q, k, v, q_pos, k_pos = prefill_step(T=27, D=6, seed=5)
    out = call_lag(q, k, v, q_pos, k_pos, 4, budget_f=1.0, sinks=2)
    assert kept(out[2]) == kept(k_pos)


def test_lag_scores_rank_within_each_partition():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 4 + 5 * 8 + 3, 6, generator=g), torch.randn(2, 4 + 5 * 8 + 3, 6, generator=g)
    s = lag_scores(k, v, 4, 8)
    assert torch.equal(s[:, :4], torch.ones(2, 4)) and torch.equal(s[:, 4 + 4 * 8:], torch.ones(2, 8 + 3))
    for p in range(4):
        part = s[:, 4 + 8 * p: 4 + 8 * (p + 1)]
        assert torch.equal(part.sort(dim=-1).values, (torch.arange(8) / 8).expand(2, 8))


def test_lagkv_is_documented_and_query_free():
    s = SCORERS["lagkv"]
    assert not s.needs_q and s.lagged and s.default_sinks == 4 and "2504.04704" in s.paper
