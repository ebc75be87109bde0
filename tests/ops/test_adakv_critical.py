"""CriticalAdaKV (``ops/adakv_critical.py``, kvpress ``CriticalAdaKVPress``) through the registered
``evict_adakv_scored`` op against a loop oracle on random attention, values and o_proj weights; ``first=1`` is
Ada-KV SnapKV with kvpress's split; budget >= length is the identity."""

from __future__ import annotations

import math

import pytest
import torch

from graphwright.ops.adakv_ref import adakv_reference, pack_heads_reference, packed_positions_reference
from graphwright.ops.adakv_scored import EVICT_ADAKV_SCORED
from tests.ops.scorer_oracles import kept, prefill_step, snapkv_oracle
from tests.ops.test_scorer_criticalkv import _vo_norm

SCALE = 0.35


def call(q, k, v, q_pos, wo, budget_n=0, budget_f=0.0, floor=0.2, window=3, kernel=3, first=0.5, eps=1e-4, sinks=0):
    hk = k.shape[1]
    return EVICT_ADAKV_SCORED(q, pack_heads_reference(k), pack_heads_reference(v), q_pos,
                              packed_positions_reference(q_pos, hk), None, SCALE, "criticalkv", budget_n, budget_f,
                              floor, sinks, window, kernel, "avg", "mean", 0, "sum", 16, eps, 1.0, 0, 1, wo, first)


def oracle(q, k, v, q_pos, k_pos, wo, budget_n, budget_f, floor, window, kernel, first, eps):
    """Loops, kvpress's order: forced top n_safe per head (window first), global top of the rest to Hk * n_kept
    (ties: lower head, then slot), stage 1 top max(n_safe, int(first n_h)) by a, the rest by (a + eps) ||v W_O||_1.
    Returns ([B][Hk] kept positions, [B][Hk] head budgets n_h, window included)."""
    B, H, T, _ = q.shape
    Hk = k.shape[1]
    g = H // Hk
    a_sum = snapkv_oracle(q, k, q_pos, k_pos, SCALE, window, kernel)
    out, budgets = [], []
    for b in range(B):
        pos = [int(p) for p in q_pos[b]]
        L = max(pos) + 1
        n_kept = budget_n + math.floor(budget_f * L + 1e-9)
        valid = [s for s in range(T) if pos[s] >= 0]
        prot = [s for s in valid if pos[s] >= L - window]
        cand = [s for s in valid if s not in prot]
        if L <= n_kept:
            out.append([sorted(pos[s] for s in valid)] * Hk)
            budgets.append(None)
            continue
        a = [{s: a_sum[b][h][s] / window for s in cand} for h in range(Hk)]
        n_safe = max(1, int(n_kept * floor)) if floor > 0 else 0
        forced = [sorted(cand, key=lambda s: (-a[h][s], s))[:max(0, n_safe - len(prot))] for h in range(Hk)]
        rest = sorted((-a[h][s], h * T + s, h) for h in range(Hk) for s in cand if s not in forced[h])
        left = min(Hk * (n_kept - len(prot)), Hk * len(cand)) - sum(len(f) for f in forced)
        counts = [len(forced[h]) + sum(1 for e in rest[:left] if e[2] == h) for h in range(Hk)]
        rows = []
        for h in range(Hk):
            m = min(counts[h], max(0, max(n_safe, math.floor(first * (counts[h] + len(prot)))) - len(prot)))
            stage1 = sorted(cand, key=lambda s: (-a[h][s], s))[:m]
            two = {s: (a[h][s] + eps) * _vo_norm(v, wo, b, h, s, g) for s in cand if s not in stage1}
            stage2 = sorted(two, key=lambda s: (-two[s], s))[:counts[h] - m]
            rows.append(sorted(pos[s] for s in prot + stage1 + stage2))
        out.append(rows)
        budgets.append([c + len(prot) for c in counts])
    return out, budgets


def _inputs(seed, T=14, Hk=2, H=4):
    q, k, v, q_pos, k_pos = prefill_step(Hk=Hk, H=H, T=T, seed=seed)
    wo = torch.randn(6, H * 8, generator=torch.Generator().manual_seed(seed + 1)) * torch.linspace(0.2, 3.0, H * 8)
    return q, k, v, q_pos, k_pos, wo


@pytest.mark.parametrize("budget_n,budget_f", [(8, 0.0), (0, 0.5)])
@pytest.mark.parametrize("floor,first,eps", [(0.2, 0.5, 1e-4), (0.5, 0.3, 0.5), (0.0, 0.0, 1e-4)])
def test_kept_sets_match_the_loop_oracle(budget_n, budget_f, floor, first, eps):
    q, k, v, q_pos, k_pos, wo = _inputs(21)
    out = call(q, k, v, q_pos, wo, budget_n, budget_f, floor=floor, first=first, eps=eps)
    want, budgets = oracle(q, k, v, q_pos, k_pos, wo, budget_n, budget_f, floor, 3, 3, first, eps)
    assert kept(out[2]) == want
    assert any(len(set(n)) > 1 for n in budgets if n)  # the heads really get different budgets here
    # packed: the layer holds sum_h n_h slots, not Hk times the largest head
    assert out[0].shape[1] == 1 and out[0].shape[2] == max(sum(len(h) for h in row) for row in want)


def test_value_norm_changes_the_sets_and_first_one_is_kvpress_split_snapkv():
    q, k, v, q_pos, k_pos, wo = _inputs(23, T=16)
    snap = adakv_reference(q, pack_heads_reference(k), pack_heads_reference(v), q_pos,
                           packed_positions_reference(q_pos, 2), SCALE, 8, 3, 3, "avg", True, 0.2, 0, 1, 0.0,
                           split="kvpress")
    one = call(q, k, v, q_pos, wo, 8, first=1.0)
    assert kept(one[2]) == kept(snap[2])
    assert kept(call(q, k, v, q_pos, wo, 8, first=0.0)[2]) != kept(snap[2])


def test_budget_at_least_length_is_the_identity():
    q, k, v, q_pos, _, wo = _inputs(25, T=12)
    pk, pv, kp = pack_heads_reference(k), pack_heads_reference(v), packed_positions_reference(q_pos, 2)
    out = call(q, k, v, q_pos, wo, 12)  # row 0 unpadded: bit-identical; row 1: padding dropped only
    assert torch.equal(out[0][0], pk[0]) and torch.equal(out[1][0], pv[0]) and torch.equal(out[2][0], kp[0])
    assert kept(out[2]) == kept(kp)
    assert kept(call(q, k, v, q_pos, wo, 0, 1.0)[2]) == kept(kp)


def test_without_wo_it_says_what_is_missing():
    q, k, v, q_pos, _, _ = _inputs(27, T=12)
    with pytest.raises(ValueError, match="o_proj weight"):
        call(q, k, v, q_pos, None, 6)
