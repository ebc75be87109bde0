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


@pytest.mark.parametrize("seed", [3, 4])
def test_tova_matches_oracle_and_is_shared_by_heads(seed):
    q, k, v, q_pos, k_pos = random_step(T=1, seed=seed, holes=False)
    out = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="tova", budget_n=6)
    want = select_oracle(tova_oracle(q, k, q_pos, k_pos, SCALE), k_pos, q_pos, 6)
    assert kept(out[2]) == want
    assert all(row[0] == row[1] for row in want) and all(len(row[0]) == 6 for row in want)


@pytest.mark.parametrize("window,kernel", [(3, 1), (4, 5)])
def test_snapkv_scorer_matches_oracle(window, kernel):
    q, k, v, q_pos, k_pos = prefill_step(seed=5)
    out = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="snapkv", when="prefill", budget_n=7, window=window,
                  kernel=kernel)
    want = select_oracle(snapkv_oracle(q, k, q_pos, k_pos, SCALE, window, kernel), k_pos, q_pos, 7, window=window)
    assert kept(out[2]) == want


def test_cumulative_scorer_matches_oracle():
    q, k, v, q_pos, k_pos = random_step(T=2, seed=6)
    prior = torch.rand(2, 2, k.shape[2] - 2)
    out = call_op(q, k, v, q_pos, k_pos, scale=SCALE, state=prior, scorer="h2o", budget_n=6, window=2)
    acc = torch.cat([prior, torch.zeros(2, 2, 2)], 2) + colsum_oracle(q, k, q_pos, k_pos, SCALE)
    assert kept(out[2]) == select_oracle(acc.tolist(), k_pos, q_pos, 6, window=2)
    for b in range(2):
        for h in range(2):
            want = sorted(float(acc[b, h, s]) for s in range(k.shape[2]) if int(k_pos[b, h, s]) in kept(out[2])[b][h])
            got = sorted(float(x) for x, p in zip(out[3][b, h], out[2][b, h]) if p >= 0)
            assert got == pytest.approx(want, abs=1e-5)  # the running score is compacted with the cache


@pytest.mark.parametrize("scaling,partial", [(1.0, False), (1.3, True)])
def test_expected_attention_matches_oracle(scaling, partial):
    D = 8
    q, k, v, q_pos, k_pos = prefill_step(D=D, T=14, seed=7)
    inv_freq = 1.0 / (100 ** (torch.arange(0, 4 if partial else D, 2).float() / D))
    cos, sin = rope_angles(q_pos, inv_freq)
    q = _rotate(q, cos[:, None], sin[:, None], scaling)  # post-RoPE queries, as the graph holds them
    out = call_op(q, k, v, q_pos, k_pos, scale=SCALE, inv_freq=inv_freq, scorer="expected_attention", when="prefill",
                  budget_n=8, sinks=2, n_future=16, rope_scaling=scaling)
    score = expected_attention_oracle(q, k, v, q_pos, k_pos, SCALE, inv_freq, scaling, 2, 16)
    want = select_oracle(score, k_pos, q_pos, 8, sinks=2)
    assert kept(out[2]) == want and kept(out[2]) != kept(k_pos)


def test_chunkkv_chunk_one_each_head_is_the_base_scorer():
    q, k, v, q_pos, k_pos = prefill_step(seed=8)
    for base, extra in (("snapkv", {"window": 2, "kernel": 3}), ("knorm", {})):
        plain = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer=base, when="prefill", budget_n=6, **extra)
        chunked = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer=base, when="prefill", budget_n=6, chunk=1,
                          chunk_heads="each", **extra)
        assert kept(chunked[2]) == kept(plain[2]), base


@pytest.mark.parametrize("chunk,head_sum", [(3, True), (4, False), (2, True)])
def test_chunkkv_matches_oracle(chunk, head_sum):
    q, k, v, q_pos, k_pos = prefill_step(T=12, pad=(0, 0), seed=9)
    out = call_op(q, k, v, q_pos, k_pos, scorer="knorm", when="prefill", budget_n=6, chunk=chunk,
                  chunk_heads="sum" if head_sum else "each")
    assert kept(out[2]) == chunk_oracle(knorm_oracle(k), k_pos, q_pos, 6, chunk, head_sum)
    if head_sum:
        assert all(row[0] == row[1] for row in kept(out[2]))


def test_pyramid_budgets_follow_the_formula():
    from graphwright.ops.adakv_ref import pyramid_budget

    q, k, v, q_pos, k_pos = prefill_step(T=40, pad=(0, 0), B=1, seed=10)
    sizes = []
    for layer in range(4):
        out = call_op(q, k, v, q_pos, k_pos, scorer="knorm", when="prefill", budget_n=12, window=2, beta=4.0,
                      layer=layer, num_layers=4)
        sizes.append(len(kept(out[2])[0][0]))
        c = pyramid_budget(10, 38, 0, layer, 4, 4.0)
        assert kept(out[2]) == select_oracle(knorm_oracle(k), k_pos, q_pos, c + 2, window=2)
    assert sizes[0] > sizes[-1] and abs(sum(sizes) - 4 * 12) <= 4


@pytest.mark.parametrize("when,every", [("every", 3), ("overflow", 0)])
def test_schedules_evict_only_on_their_steps(when, every):
    budget, slack = 6, 2
    seen = []

    def op(q, k, v, q_pos, k_pos):
        return call_op(q, k, v, q_pos, k_pos, scorer="knorm", when=when, every=every, slack=slack, budget_n=budget)[:3]

    def check(L, k_pos, extra):
        n = int((k_pos[0, 0] >= 0).sum())
        seen.append(n)
        if when == "every":
            if L % every == 0 or L == 10:
                assert n == budget, (L, n)
            else:
                assert n == seen[-2] + 1  # no eviction off-schedule: the cache grew by the new token
        else:
            assert n <= budget + slack and (n == budget or n == (seen[-2] + 1 if len(seen) > 1 else n))

    op_decode_loop(op, [], 12, prompt=10, on_step=check)
    assert seen[0] == budget and max(seen) == (budget + every - 1 if when == "every" else budget + slack)


def test_prefill_schedule_appends_at_decode():
    seen = []

    def op(q, k, v, q_pos, k_pos):
        return call_op(q, k, v, q_pos, k_pos, scorer="keydiff", when="prefill", budget_n=4)[:3]

    op_decode_loop(op, [], 5, prompt=9, on_step=lambda L, kp, e: seen.append(int((kp[0, 0] >= 0).sum())))
    assert seen == [4, 5, 6, 7, 8, 9]


def test_every_scorer_is_documented():
    for s in SCORERS.values():
        mod = __import__(s.fn.__module__, fromlist=["x"])
        assert s.paper in mod.__doc__ and "exact setting" in mod.__doc__.lower(), s.name


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_mean_rotation_follows_the_models_own_rotary_embedding(name):
    """Rbar of Expected Attention equals the mean of the HF model's apply_rotary_pos_emb over the future positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from graphwright.ops.scorers.expected_attention import mean_rotation
    from graphwright.passes.streaming import find_rotary
    from tests.conftest import _compiled, _tiny

    model = _tiny(name)
    rope = model.model.rotary_emb
    D = model.config.hidden_size // model.config.num_attention_heads
    inv, scaling = find_rotary(_compiled(name).step_graph.gm)
    gm = _compiled(name).step_graph.gm
    inv_freq = functools.reduce(getattr, inv.target.split("."), gm)  # the graph's own rotary table
    x = torch.randn(1, 3, 1, D, generator=torch.Generator().manual_seed(11))
    L, n_f = 17, 6
    want = torch.zeros_like(x)
    for p in range(L, L + n_f):
        cos, sin = rope(x, torch.tensor([[p]]))
        want += apply_rotary_pos_emb(x, x, cos, sin)[0] / n_f
    got = x @ mean_rotation(torch.tensor([L]), n_f, inv_freq, scaling, D)[:, None]
    assert torch.allclose(got, want, atol=1e-5)
