"""Q-Filters (arXiv 2503.02812) through the registered ``evict_scored_qfilter`` op against a loop oracle."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops.policy_scored import SCORED_QFILTER_POLICY
from tests.ops.scorer_oracles import DEFAULTS, kept, prefill_step, select_oracle


def call_qfilter(q, k, v, q_pos, k_pos, qfilter, **params):
    args = dict(DEFAULTS, scorer="qfilter", **params)
    return SCORED_QFILTER_POLICY.op(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, qfilter=qfilter, scale=0.35, **args)


def qfilter_oracle(k, f):
    B, Hk, S, D = k.shape
    return [[[-sum(float(f[h, d]) * float(k[b, h, s, d]) for d in range(D)) for s in range(S)] for h in range(Hk)]
            for b in range(B)]


@pytest.mark.parametrize("budget,sinks,window,when", [(5, 0, 0, "prefill"), (0.5, 2, 3, "prefill"), (6, 1, 2, "decode")])
def test_qfilter_matches_the_loop_oracle(budget, sinks, window, when):
    q, k, v, q_pos, k_pos = prefill_step(T=14, D=8, seed=7)
    f = torch.randn(k.shape[1], 8, generator=torch.Generator().manual_seed(1))
    n, fr = (budget, 0.0) if isinstance(budget, int) else (0, budget)
    out = call_qfilter(q, k, v, q_pos, k_pos, f, budget_n=n, budget_f=fr, sinks=sinks, window=window, when=when)
    assert kept(out[2]) == select_oracle(qfilter_oracle(k, f), k_pos, q_pos, n, fr, sinks, window)
    assert kept(out[2]) != kept(k_pos)


def test_qfilter_sign_keeps_keys_along_minus_the_filter():
    """Keys built as a * (-f) + noise: the largest a are kept (the score is -<f, k>)."""
    B, Hk, T, D = 1, 2, 10, 8
    g = torch.Generator().manual_seed(2)
    f = torch.nn.functional.normalize(torch.randn(Hk, D, generator=g), dim=-1)
    a = torch.arange(T, dtype=torch.float32).flip(0)  # position 0 has the largest a
    k = a[None, None, :, None] * -f[None, :, None, :] + 0.01 * torch.randn(B, Hk, T, D, generator=g)
    q_pos = torch.arange(T)[None]
    out = call_qfilter(torch.randn(B, 4, T, D), k, torch.randn(B, Hk, T, D), q_pos, q_pos[:, None].expand(B, Hk, T).clone(),
                       f, budget_n=3, when="prefill")
    assert kept(out[2]) == [[[0, 1, 2], [0, 1, 2]]]


def test_qfilter_exact_setting_keeps_everything_and_checks_shapes():
    q, k, v, q_pos, k_pos = prefill_step(T=12, D=8, seed=3)
    f = torch.randn(k.shape[1], 8)
    out = call_qfilter(q, k, v, q_pos, k_pos, f, budget_f=1.0)
    assert kept(out[2]) == kept(k_pos)
    with pytest.raises(ValueError, match="expected \\(2, 8\\)"):
        call_qfilter(q, k, v, q_pos, k_pos, torch.randn(3, 8), budget_n=4)
