"""Keyformer (``passes/keyformer.py``, ``ops/policy_keyformer.py``): exact setting, budget, loop oracles, seeded noise."""

from __future__ import annotations

import math

import pytest
import torch

import graphwright as gw
from graphwright import RecipeError
from graphwright.ops.eviction_ref import h2o_reference
from graphwright.ops.policy_keyformer import EVICT_KEYFORMER, gumbel_noise, keyformer_step
from tests.conftest import _tiny
from tests.passes.eviction_helpers import kept_positions, op_decode_loop
from tests.passes.stateful_helpers import assert_covering_budget_is_dense, assert_lowrank_kv_and_steer_compose, drive, generate_tiny, kept, softmax

SCALE = 1 / math.sqrt(8)


def _meta(B=2, Hk=2):
    return torch.zeros(B, Hk, 0, dtype=torch.long)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_int_budget_covering_prompt_and_new_tokens_is_identity(model):
    assert_covering_budget_is_dense("keyformer(kv=46)", model)  # 14 + 32


def test_kv_one_is_not_exact_for_decode():
    """k is frozen at the prompt length: with kv=1.0 the cache stops growing at the first new token."""
    dense, _, _, _ = generate_tiny(None)
    cm, got, ids, _ = generate_tiny("keyformer(kv=1.0)")
    assert got.shape == (2, ids.shape[1] + 32)
    assert cm.last_stats["kv_bytes"] < dense.last_stats["kv_bytes"]


def test_budget_is_frozen_at_the_prompt_and_holds_for_300_steps():
    seen = []

    def check(length, k_pos, extra):
        counts = (k_pos >= 0).sum(-1)
        k = math.floor(10 * 0.6)  # prompt 10, kv 0.6
        assert torch.all(counts == min(length, k - 1)), (length, counts)
        assert extra[1][..., 0].eq(k).all() and extra[1][..., 2].eq(len(seen) + 1).all()  # (k, w, t)
        seen.append(length)

    def op(q, k, v, q_pos, k_pos, score, meta):
        return EVICT_KEYFORMER(q, k, v, q_pos, k_pos, score, meta, SCALE, 0, 0.6, 0.3, 1.0, 0.01, 7, 0, "gumbel")

    op_decode_loop(op, [torch.zeros(2, 2, 0), _meta()], steps=300, B=2, on_step=check)
    assert len(seen) == 301


def test_no_noise_tau_one_equals_h2o_accumulation():
    """noise none, tau 1 (delta 0): scores are g x H2O's (mean over g) and the kept sets are H2O's with
    heavy = k - w, recent = w - 1, over 200 steps."""
    kf_log, h2o_log = [], []
    k, w = 8, 4  # prompt 10, kv 0.8, recent 0.5

    def kf(q, kk, v, q_pos, k_pos, score, meta):
        return EVICT_KEYFORMER(q, kk, v, q_pos, k_pos, score, meta, SCALE, 0, 0.8, 0.5, 1.0, 0.0, 0, 0, "none")

    def h2o(q, kk, v, q_pos, k_pos, score):
        return h2o_reference(q, kk, v, q_pos, k_pos, score, SCALE, k - w, 0.0, w - 1, 0.0)

    op_decode_loop(kf, [torch.zeros(2, 2, 0), _meta()], steps=200, B=2,
                   on_step=lambda n, kp, ex: kf_log.append((kept_positions(kp), ex[0])))
    op_decode_loop(h2o, [torch.zeros(2, 2, 0)], steps=200, B=2,
                   on_step=lambda n, kp, ex: h2o_log.append((kept_positions(kp), ex[0])))
    for (sets_kf, s_kf), (sets_h, s_h) in zip(kf_log, h2o_log):
        assert sets_kf == sets_h
        torch.testing.assert_close(s_kf, 2 * s_h, rtol=1e-5, atol=1e-5)  # g = 2 query heads per KV head
    assert max(len(h) for heads in kf_log[-1][0] for h in heads) == k - 1


def _position_noise(Zpre, Zdec, g):
    """A noise function drawing zeta by (step, row, query head, query row, key *position*)."""
    def make(k_pos):
        def noise(step, t0, shape):
            B, H, rows, S = shape
            table = Zpre[:, :, t0:t0 + rows] if step == 0 else Zdec[step - 1][:, :, None]
            idx = k_pos.clamp(min=0).repeat_interleave(g, dim=1)[:, :, None, :].expand(B, H, rows, S)
            return table.gather(-1, idx)
        return noise
    return make


@pytest.mark.parametrize("kv, recent, tau_delta", [(0.7, 0.3, 0.01), (5, 0.0, 0.05)])
def test_fixed_noise_kept_sets_equal_a_python_loop(kv, recent, tau_delta):
    """Batch 2 ragged (prompts 10 and 6), 250 decode steps, Gumbel noise from a fixed table by position."""
    steps, lengths, H, Hk, g = 250, (10, 6), 4, 2, 2
    B, maxpos = 2, max(lengths) + steps + 1
    gen = torch.Generator().manual_seed(3)
    gum = lambda *s: -torch.log(-torch.log(torch.rand(*s, generator=gen).clamp(1e-12, 1 - 1e-7)))  # noqa: E731
    Zpre, Zdec = gum(B, H, max(lengths), maxpos), gum(steps, B, H, maxpos)
    make = _position_noise(Zpre, Zdec, g)
    kn, kf = (kv, 0.0) if isinstance(kv, int) else (0, kv)

    def op(q, k, v, q_pos, k_pos, score, meta):
        return keyformer_step(q, k, v, q_pos, k_pos, score, meta, SCALE, kn, kf, recent, 1.0, tau_delta, make(k_pos))

    oracle = [[{} for _ in range(Hk)] for _ in range(B)]  # pos -> accumulated score
    budget = [kn + math.floor(kf * n + 1e-9) for n in lengths]
    evicted_somewhere = False
    for i, _q, q_pos, _k_in, outs, (Q, K) in drive(op, [torch.zeros(B, Hk, 0), _meta()], steps, lengths, H, Hk):
        if i == 0:
            QK = torch.einsum("bhpd,bhsd->bhps", Q.double(), K.double().repeat_interleave(g, dim=1)) * SCALE
        tau = 1.0 + i * tau_delta
        for b in range(B):
            L = int(q_pos[b].max()) + 1
            kb = max(budget[b], 1)
            w = math.floor(kb * recent + 1e-9)
            for h in range(Hk):
                sc = oracle[b][h]
                for p in q_pos[b].tolist():
                    if p >= 0:
                        sc[p] = 0.0
                for hq in range(h * g, (h + 1) * g):
                    for t, qp in enumerate(q_pos[b].tolist()):
                        if qp < 0:
                            continue
                        vis = sorted(p for p in sc if p <= qp)
                        z = [float(Zpre[b, hq, t, p] if i == 0 else Zdec[i - 1, b, hq, p]) for p in vis]
                        f = softmax([(float(QK[b, hq, qp, p]) + zz) / tau for p, zz in zip(vis, z)])
                        for p, x in zip(vis, f):
                            sc[p] += x
                rec = max(w - 1, 0)
                recent_set = {p for p in sc if p >= L - rec}
                older = sorted((p for p in sc if p not in recent_set), key=lambda p: (-sc[p], p))
                keep = recent_set | set(older[:max(kb - 1 - rec, 0)])
                for p in list(sc):
                    if p not in keep:
                        del sc[p]
                        evicted_somewhere = True
                assert kept(outs[2], b, h) == sorted(keep), (i, b, h)
                got = {int(p): float(s) for p, s in zip(outs[2][b, h], outs[3][b, h]) if p >= 0}
                assert all(abs(got[p] - sc[p]) <= 1e-4 * max(1.0, sc[p]) for p in keep)
    assert evicted_somewhere


def test_seeded_noise_is_reproducible_per_layer_and_step_and_gumbel_distributed():
    a = gumbel_noise(seed=3, layer=1)(5, 0, (2, 4, 1, 6))
    assert torch.equal(a, gumbel_noise(seed=3, layer=1)(5, 0, (2, 4, 1, 6)))
    for other in (gumbel_noise(4, 1)(5, 0, (2, 4, 1, 6)), gumbel_noise(3, 2)(5, 0, (2, 4, 1, 6)), gumbel_noise(3, 1)(6, 0, (2, 4, 1, 6))):
        assert not torch.equal(a, other)
    big = gumbel_noise(0, 0)(0, 0, (400, 1000))
    assert abs(float(big.mean()) - 0.5772157) < 0.01  # Euler-Mascheroni constant
    assert abs(float(big.var()) - math.pi ** 2 / 6) < 0.02
    assert torch.isfinite(big).all()


def test_seed_changes_the_kept_set_and_none_ignores_it():
    def sets(seed, noise):
        out = []

        def op(q, k, v, q_pos, k_pos, score, meta):
            return EVICT_KEYFORMER(q, k, v, q_pos, k_pos, score, meta, SCALE, 0, 0.6, 0.3, 1.0, 0.01, seed, 0, noise)
        op_decode_loop(op, [torch.zeros(2, 2, 0), _meta()], steps=60, B=2, prompt=20,
                       on_step=lambda n, kp, ex: out.append(kept_positions(kp)))
        return out

    assert sets(1, "gumbel") == sets(1, "gumbel")
    assert sets(1, "gumbel") != sets(2, "gumbel")
    assert sets(1, "none") == sets(2, "none")


def test_bad_arguments_are_refused_with_the_allowed_values():
    with pytest.raises(RecipeError, match="noise"):
        gw.compile(_tiny("tiny-llama"), recipe="keyformer(noise='uniform')")
    with pytest.raises(RecipeError, match="kv must be > 0"):
        gw.compile(_tiny("tiny-llama"), recipe="keyformer(kv=0)")


def test_composes_with_lowrank_kv_and_steer():
    assert_lowrank_kv_and_steer_compose("keyformer(kv=30)", "keyformer(kv=0.5)", 0.6, "keyformer(kv=0.5)")
