"""Each scorer's kept set equals a slow loop oracle on random attention (ALGORITHMS-2 §6), through the registered op."""

from __future__ import annotations

import functools

import pytest
import torch

from graphwright.ops.rope_index_ref import _rotate, rope_angles
from graphwright.ops.scorers import SCORERS
from graphwright.ops.scorers.near_ties import REL, snap_near_ties
from tests.ops.scorer_oracles import (
    call_op,
    chunk_oracle,
    expected_attention_oracle,
    kept,
    keydiff_oracle,
    knorm_oracle,
    prefill_step,
    select_oracle,
    snapkv_oracle,
    tova_oracle,
)
from tests.passes.eviction_helpers import colsum_oracle, op_decode_loop, random_step

SCALE = 0.35


@pytest.mark.parametrize("budget", [5, 0.5])
@pytest.mark.parametrize("sinks,window", [(0, 0), (2, 3)])
def test_knorm_and_keydiff_match_oracles(budget, sinks, window):
    q, k, v, q_pos, k_pos = random_step(T=1, seed=1)
    n, f = (budget, 0.0) if isinstance(budget, int) else (0, budget)
    for name, oracle in (("knorm", knorm_oracle(k)), ("keydiff", keydiff_oracle(k, k_pos))):
        out = call_op(q, k, v, q_pos, k_pos, scorer=name, budget_n=n, budget_f=f, sinks=sinks, window=window)
        assert kept(out[2]) == select_oracle(oracle, k_pos, q_pos, n, f, sinks, window), name


def test_knorm_pre_and_post_rope_keep_the_same_set():
    q, k, v, q_pos, k_pos = prefill_step(D=8, seed=2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    cos, sin = rope_angles(k_pos, inv_freq)
    k_rot = _rotate(k, cos, sin, 1.0)
    assert not torch.allclose(k_rot, k)
    pre = call_op(q, k, v, q_pos, k_pos, scorer="knorm", when="prefill", budget_n=5)
    post = call_op(q, k_rot, v, q_pos, k_pos, scorer="knorm", when="prefill", budget_n=5)
    assert kept(pre[2]) == kept(post[2])
    assert kept(pre[2]) != kept(k_pos)  # something was evicted


def _snap_oracle(s, cand, rel):
    """Python lists: sort the candidates, chain neighbours within rel of the larger magnitude, chain min."""
    out = [row[:] for row in s]
    for h, row in enumerate(s):
        idx = sorted((j for j in range(len(row)) if cand[h][j]), key=lambda j: row[j])
        low = None
        for i, j in enumerate(idx):
            a = row[idx[i - 1]] if i else None
            if a is None or row[j] - a > rel * max(abs(a), abs(row[j])):
                low = row[j]
            out[h][j] = low
    return out


def test_snap_near_ties_matches_the_oracle_and_ignores_slot_order():
    g = torch.Generator().manual_seed(5)
    base = -(1 + torch.rand(3, 12, generator=g))
    base[:, 4] = base[:, 1] * (1 + 3e-7)  # a rounding-level pair
    base[:, 7] = base[:, 4] * (1 - 8e-6)  # chained to it (within REL of 4, not of 1's exact value)
    base[:, 9] = base[:, 1] * (1 + 5e-5)  # distinct: beyond REL
    cand = torch.rand(3, 12, generator=g) < 0.85
    cand[:, [1, 4, 7, 9]] = True
    s = base[None]
    got = snap_near_ties(s, cand[None])
    assert got[0].tolist() == _snap_oracle(base.tolist(), cand.tolist(), REL)
    assert torch.equal(got[0, :, 1], got[0, :, 4]) and torch.equal(got[0, :, 4], got[0, :, 7])
    assert not torch.equal(got[0, :, 9], got[0, :, 1])
    perm = torch.randperm(12, generator=g)
    assert torch.equal(snap_near_ties(s[..., perm], cand[None][..., perm]), got[..., perm])
    assert torch.equal(snap_near_ties(s, cand[None], rel=0.0), s)  # exact setting: distinct values stay


def test_knorm_ties_a_repeated_key_at_any_rounding():
    """The same key at two positions, one copy a few ulps off (another backend's rounding): the two tie, so the
    later one leaves, whichever of the two is the larger in fp32 (without the near-tie rule the order flips)."""
    q, k, v, q_pos, k_pos = prefill_step(D=8, seed=2, pad=(0, 0))
    a, b = 3, 7  # slot b becomes a copy of slot a in every (row, head), with the largest norm: one of them leaves
    k = k.clone()
    k[:, :, b] = k[:, :, a]
    k[:, :, [a, b]] *= 1.5 * k.float().norm(dim=-1).amax() / k[:, :, [a, b]].float().norm(dim=-1, keepdim=True)
    sets = []
    for ulps in (0, 2, -2):
        kk = k.clone()
        kk[:, :, a] *= 1 + ulps * 2.0 ** -23
        assert ulps == 0 or not torch.equal(kk[:, :, a].norm(dim=-1), kk[:, :, b].norm(dim=-1))
        sets.append(kept(call_op(q, kk, v, q_pos, k_pos, scorer="knorm", when="prefill", budget_n=11)[2]))
    assert sets[0] == sets[1] == sets[2]
    assert all(a in h and b not in h and len(h) == 11 for row in sets[0] for h in row)
