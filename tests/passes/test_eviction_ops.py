"""Eviction op references against slow loop oracles on random attention; custom ops vs references."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops import eviction as ev
from graphwright.ops.eviction_ref import colsum, compact, h2o_reference, snapkv_reference, streaming_reference
from graphwright.ops.rope_index_ref import rope_angles, rope_cache_index_reference, rope_invert_reference
from tests.passes.eviction_helpers import colsum_oracle, kept_positions, probs_oracle, random_step, topk_oracle

SCALE = 0.35


def prefill_step(lengths=(20, 14), H=4, Hk=2, D=8, seed=0):
    """A prefill step: empty cache, left-padded rows of the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    q_pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g),
            torch.randn(B, Hk, T, D, generator=g), q_pos, q_pos[:, None].expand(B, Hk, T).clone())


def test_colsum_equals_loop():
    q, k, v, q_pos, k_pos = random_step(T=3, seed=1)
    q_pos[1, 0] = -1  # a padding query row contributes nothing
    torch.testing.assert_close(colsum(q, k, q_pos, k_pos, SCALE), colsum_oracle(q, k, q_pos, k_pos, SCALE), atol=1e-5, rtol=1e-5)


def test_compact_layout():
    q, k, v, q_pos, k_pos = random_step(seed=2)
    keep = torch.rand(k_pos.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    kk, vv, kp, extra = compact(keep, k, v, k_pos, (torch.arange(k_pos.numel()).view(k_pos.shape).float(),))
    want = keep & (k_pos >= 0)
    assert kp.shape[-1] == int(want.sum(-1).max())
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            slots = want[b, h].nonzero().flatten()
            n = len(slots)
            assert kp[b, h, :n].tolist() == k_pos[b, h, slots].tolist() and (kp[b, h, n:] == -1).all()
            torch.testing.assert_close(kk[b, h, :n], k[b, h, slots])
            torch.testing.assert_close(vv[b, h, :n], v[b, h, slots])
            assert extra[b, h, :n].tolist() == (slots + (b * k.shape[1] + h) * k_pos.shape[-1]).float().tolist()


@pytest.mark.parametrize("heavy,recent", [((3, 0.0), (2, 0.0)), ((0, 0.2), (0, 0.1)), ((1, 0.0), (0, 0.0))])
def test_h2o_kept_set_equals_oracle(heavy, recent):
    q, k, v, q_pos, k_pos = random_step(T=2, seed=3)
    S = k.shape[2] - 2
    score = torch.rand(k.shape[0], k.shape[1], S, generator=torch.Generator().manual_seed(1))
    kk, vv, kp, sc = h2o_reference(q, k, v, q_pos, k_pos, score, SCALE, heavy[0], heavy[1], recent[0], recent[1])
    full = torch.cat([score, torch.zeros(*score.shape[:2], 2)], 2) + colsum_oracle(q, k, q_pos, k_pos, SCALE)
    for b in range(k.shape[0]):
        L = int(q_pos[b].max()) + 1
        nh, nr = heavy[0] + int(heavy[1] * L + 1e-9), recent[0] + int(recent[1] * L + 1e-9)
        for h in range(k.shape[1]):
            valid = [s for s in range(k.shape[2]) if k_pos[b, h, s] >= 0]
            rec = [s for s in valid if k_pos[b, h, s] >= L - nr]
            heavy_slots = topk_oracle(full[b, h], [s for s in valid if s not in rec], nh)
            slots = sorted(rec + heavy_slots)
            assert kept_positions(kp)[b][h] == k_pos[b, h, slots].tolist()
            n = len(slots)
            torch.testing.assert_close(sc[b, h, :n], full[b, h, slots], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kk[b, h, :n], k[b, h, slots])


@pytest.mark.parametrize("kernel,pool", [(5, "avg"), (3, "max"), (1, "avg")])
def test_snapkv_kept_set_equals_oracle(kernel, pool):
    q, k, v, q_pos, k_pos = prefill_step(seed=4)
    budget, window = 9, 3
    kk, vv, kp = snapkv_reference(q, k, v, q_pos, k_pos, SCALE, budget, window, kernel, pool)
    P = probs_oracle(q, k, q_pos, k_pos, SCALE)  # [B, H, T, S]
    B, H, T, S = P.shape
    Hk = k.shape[1]
    for b in range(B):
        n = int((q_pos[b] >= 0).sum())
        for h in range(Hk):
            obs = P[b, h * 2:(h + 1) * 2, T - window:].sum(1).mean(0)  # window rows summed, mean over g
            prefix = [s for s in range(S) if 0 <= k_pos[b, h, s] < n - window]
            x = [float(obs[s]) if s in prefix else 0.0 for s in range(S)]
            r = kernel // 2
            pooled = []
            for s in range(S):
                win = [x[j] if 0 <= j < S else 0.0 for j in range(s - r, s + r + 1)]
                pooled.append(sum(win) / kernel if pool == "avg" else max(win))
            chosen = topk_oracle(pooled, prefix, budget - window)
            slots = sorted(chosen + [s for s in range(S) if k_pos[b, h, s] >= n - window])
            assert kept_positions(kp)[b][h] == k_pos[b, h, slots].tolist()
    # a row that fits keeps every real token and drops its padding; a decode step never evicts
    q, k, v, q_pos, k_pos = prefill_step(lengths=(6, 4), seed=5)
    assert kept_positions(snapkv_reference(q, k, v, q_pos, k_pos, SCALE, 8, 2, 5, "avg")[2]) == [[list(range(6))] * 2, [list(range(4))] * 2]
    q, k, v, q_pos, k_pos = random_step(T=1, seed=6)
    assert snapkv_reference(q, k, v, q_pos, k_pos, SCALE, 2, 1, 5, "avg")[2] is k_pos


def test_streaming_kept_set_equals_oracle():
    q, k, v, q_pos, k_pos = prefill_step(lengths=(20, 9), seed=7)
    kp = streaming_reference(k, v, q_pos, k_pos, 3, 5)[2]
    assert kept_positions(kp) == [[[0, 1, 2] + list(range(15, 20))] * 2, [[0, 1, 2] + list(range(4, 9))] * 2]


def test_rope_round_trip_and_cache_index():
    g = torch.Generator().manual_seed(8)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 6, 2).float() / 6))  # partial rotary: R = 6 of D = 8
    x = torch.randn(2, 3, 5, 8, generator=g)
    pos = torch.tensor([[-1, 0, 1, 2, 3], [5000, 5001, 5002, 5003, 5004]])
    cos, sin = rope_angles(pos, inv_freq)
    xr = x[..., :6]
    rot = torch.cat([-xr[..., 3:], xr[..., :3]], -1)
    post = torch.cat([(xr * cos[:, None] + rot * sin[:, None]) * 1.5, x[..., 6:]], -1)  # model RoPE, scaling 1.5
    torch.testing.assert_close(rope_invert_reference(post, pos, inv_freq, 1.5), x, atol=1e-5, rtol=1e-5)
    # contiguous slots: the cache index is the position, so cache-index RoPE is the model's RoPE
    k_pos = torch.arange(5)[None, None].expand(2, 3, 5)
    qr, kr = rope_cache_index_reference(x[:, :, -2:], x, k_pos, inv_freq, 1.5)
    pos0 = torch.arange(5).expand(2, 5)
    c0, s0 = rope_angles(pos0, inv_freq)
    want = torch.cat([(xr * c0[:, None] + rot * s0[:, None]) * 1.5, x[..., 6:]], -1)
    torch.testing.assert_close(kr, want)
    torch.testing.assert_close(qr, want[:, :, -2:])


def test_custom_ops_equal_references():
    q, k, v, q_pos, k_pos = random_step(T=1, seed=9)
    score = torch.rand(*k_pos.shape[:2], k_pos.shape[2] - 1)
    got = torch.ops.graphwright.evict_h2o(q, k, v, q_pos, k_pos, score, SCALE, 2, 0.0, 2, 0.0)
    want = h2o_reference(q, k, v, q_pos, k_pos, score, SCALE, 2, 0.0, 2, 0.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # the no-eviction fast path must not hand back an input from a custom op
    q, k, v, q_pos, k_pos = random_step(T=1, seed=9, pad=(0, 0), holes=False)
    out = torch.ops.graphwright.evict_streaming(k, v, q_pos, k_pos, 100, 100)
    assert out[0].data_ptr() != k.data_ptr() and torch.equal(out[0], k)
    assert set(ev.REFERENCES) >= set(ev.EVICT_OPS)


def test_fake_impls_give_dynamic_lengths():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    q, k, v, q_pos, k_pos = random_step(T=1, seed=10)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fq, fk, fv, fqp, fkp = (mode.from_tensor(t) for t in (q, k, v, q_pos, k_pos))
        out = torch.ops.graphwright.evict_streaming(fk, fv, fqp, fkp, 2, 3)
        assert out[0].shape[:2] == k.shape[:2] and out[2].shape[:2] == k_pos.shape[:2]
        assert not isinstance(out[0].shape[2], int)  # unbacked: the kept count is data dependent


def test_probs_oracle_rows_sum_to_one():
    q, k, v, q_pos, k_pos = random_step(T=2, seed=11)
    P = probs_oracle(q, k, q_pos, k_pos, SCALE)
    torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)))
