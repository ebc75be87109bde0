"""Head-score shares over any per-head prefill scorer (``ops/adakv_scored.py`` with ``weights``, ``rule='scores'``).

A loop oracle: each head's total b_h is the share table (``head_shares`` over every evicted (layer, KV head), the
model's total budget, floor max(protected, round(floor * budget))), and it keeps its protected tokens plus its
top-(b_h - protected) candidates by the scorer's raw score (ties to the earlier slot). Equal weights are the fixed
per-head budget; budget >= length keeps everything.
"""

from __future__ import annotations

import math

import pytest
import torch

from graphwright.ops.adakv_ref import pack_heads_reference, packed_positions_reference
from graphwright.ops.adakv_scored import EVICT_ADAKV_SCORED
from graphwright.ops.head_shares import head_shares
from tests.ops.scorer_oracles import expected_attention_oracle, kept, knorm_oracle, prefill_step, select_oracle, snapkv_oracle

SCALE = 0.35
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))


def call(q, k, v, q_pos, scorer, budget_n, weights, slot, floor=0.2, sinks=0, window=0, kernel=1, inv_freq=None):
    kp = packed_positions_reference(q_pos, k.shape[1])
    return EVICT_ADAKV_SCORED(q, pack_heads_reference(k), pack_heads_reference(v), q_pos, kp, inv_freq, SCALE, scorer,
                              budget_n, 0.0, floor, sinks, window, kernel, "avg", "mean", 0, "sum", 16, 0.0, 1.0, 0, 1,
                              None, 0.5, weights=weights, slot=slot)


def shares_oracle(score, q_pos, Hk, budget, weights, slot, floor, sinks, window):
    """Loop: ([B][Hk] kept positions, [B][Hk] totals b_h) with the share table of the row's length."""
    out, totals = [], []
    for b in range(len(score)):
        pos = [int(p) for p in q_pos[b]]
        L = max(pos) + 1
        valid = [s for s in range(len(pos)) if pos[s] >= 0]
        prot = [s for s in valid if pos[s] < sinks or pos[s] >= L - window]
        cand = [s for s in valid if s not in prot]
        if L <= budget:
            out.append([sorted(pos[s] for s in valid)] * Hk)
            totals.append(None)
            continue
        table = head_shares(tuple(weights), len(weights) * budget, L, max(len(prot), round(floor * budget)))
        mine = table[slot * Hk:(slot + 1) * Hk]
        rows = []
        for h in range(Hk):
            best = sorted(cand, key=lambda s: (-float(score[b][h][s]), s))[:mine[h] - len(prot)]
            rows.append(sorted(pos[s] for s in prot + best))
        out.append(rows)
        totals.append(list(mine))
    return out, totals


WEIGHTS = [1.0, 0.05, 0.3, 0.6, 0.01, 0.2]  # 3 layers x 2 KV heads, flat; slot 1 is the second layer


@pytest.mark.parametrize("slot", [0, 1, 2])
@pytest.mark.parametrize("floor,sinks,window", [(0.0, 0, 0), (0.2, 1, 2)])
def test_knorm_and_expected_attention_keep_the_share_table(slot, floor, sinks, window):
    q, k, v, q_pos, k_pos = prefill_step(Hk=2, H=4, T=14, seed=21)
    for name, score, inv in (("knorm", knorm_oracle(k), None),
                             ("expected_attention", expected_attention_oracle(q, k, v, q_pos, k_pos, SCALE, INV_FREQ, 1.0,
                                                                              sinks, 16), INV_FREQ)):
        out = call(q, k, v, q_pos, name, 6, WEIGHTS, slot, floor, sinks, window, inv_freq=inv)
        want, totals = shares_oracle(score, q_pos, 2, 6, WEIGHTS, slot, floor, sinks, window)
        assert kept(out[2]) == want, name
        got_totals = [[len(h) for h in row] for row in kept(out[2])]
        assert got_totals == totals
    assert len({t for row in totals for t in row}) > 1  # ragged: the heads' budgets differ


def test_snapkv_scorer_with_shares_matches_the_oracle():
    q, k, v, q_pos, k_pos = prefill_step(Hk=2, H=4, T=12, seed=22)
    sn = snapkv_oracle(q, k, q_pos, k_pos, SCALE, 3, 3)
    out = call(q, k, v, q_pos, "snapkv", 7, WEIGHTS, 2, 0.0, 0, 3, kernel=3)
    assert kept(out[2]) == shares_oracle(sn, q_pos, 2, 7, WEIGHTS, 2, 0.0, 0, 3)[0]


def test_equal_weights_are_the_fixed_per_head_budget():
    q, k, v, q_pos, k_pos = prefill_step(Hk=2, H=4, T=14, seed=23)
    out = call(q, k, v, q_pos, "knorm", 6, [0.5] * 6, 1, 0.2, 1, 2)
    assert kept(out[2]) == select_oracle(knorm_oracle(k), k_pos, q_pos, 6, 0.0, 1, 2)


def test_budget_at_least_length_keeps_everything_and_bad_weights_are_refused():
    q, k, v, q_pos, _ = prefill_step(Hk=2, H=4, T=12, seed=24)
    pk, kp = pack_heads_reference(k), packed_positions_reference(q_pos, 2)
    out = call(q, k, v, q_pos, "knorm", 12, WEIGHTS, 0)
    assert torch.equal(out[0][0], pk[0]) and torch.equal(out[2][0], kp[0]) and kept(out[2]) == kept(kp)
    with pytest.raises(ValueError, match="not whole layers of 2 KV heads"):
        call(q, k, v, q_pos, "knorm", 6, WEIGHTS[:5], 0)
    with pytest.raises(ValueError, match="holding slot 3"):
        call(q, k, v, q_pos, "knorm", 6, WEIGHTS, 3)
    assert math.isclose(sum(head_shares(tuple(WEIGHTS), 36, 12, 0)), 36)
