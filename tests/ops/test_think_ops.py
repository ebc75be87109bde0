"""ThinK ops (``graphwright.think_prune`` / ``think_expand``) against loop oracles and masked dense logits."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops.think import think_expand, think_prune
from graphwright.ops.think_ref import think_prune_reference

B, H, HK, D = 2, 4, 2, 8
G = H // HK


def _batch(T=10, pad=3, seed=0):
    """q [B, H, T, D], k/v [B, Hk, T, D], q_pos [B, T] with row 1 left-padded by ``pad``; shared k_pos."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, HK, HK))
    q_pos = torch.stack([torch.arange(T), torch.arange(T) - pad]).clamp(min=-1)
    q_pos[1, :pad] = -1
    return q, k, v, q_pos


def _empty(k):
    return k.new_zeros(B, HK, 0, 1), torch.zeros(B, HK, 0, 1, dtype=torch.long)


def _prefill(q, k, v, q_pos, k_pos, keep, recent, window=4, pool="mean"):
    narrow, ch = k.new_zeros(B, HK, 0, keep), torch.zeros(B, HK, 0, keep, dtype=torch.long)
    return think_prune(q, k, narrow, ch, k, v, q_pos, k_pos, keep, recent, window, pool)


def oracle_channels(q, k, q_pos, k_pos, keep, window, pool):
    """Loops over (row, KV head, channel): the two means, the product, the sorted top ``keep`` channels."""
    T = q.shape[2]
    out = torch.zeros(B, HK, keep, dtype=torch.long)
    for b in range(B):
        rows = [t for t in range(T - min(window, T), T) if q_pos[b, t] >= 0]
        for kh in range(HK):
            slots = [s for s in range(k.shape[2]) if (k_pos[b, s] if k_pos.dim() == 2 else k_pos[b, kh, s]) >= 0]
            scores = []
            for c in range(D):
                per_head = [sum(float(q[b, h, t, c]) ** 2 for t in rows) / len(rows) for h in range(kh * G, (kh + 1) * G)]
                qe = sum(per_head) / G if pool == "mean" else max(per_head)
                ke = sum(float(k[b, kh, s, c]) ** 2 for s in slots) / len(slots)
                scores.append((-qe * ke, c))
            out[b, kh] = torch.tensor(sorted(c for _, c in sorted(scores)[:keep]))
    return out


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("keep", [1, 5, 8])
def test_channels_equal_loop_oracle(pool, keep):
    q, k, v, q_pos = _batch()
    _, ch, *_ = _prefill(q, k, v, q_pos, q_pos, keep, recent=3, pool=pool)
    assert ch.shape == (B, HK, 1, keep)
    assert torch.equal(ch[:, :, 0], oracle_channels(q, k, q_pos, q_pos, keep, 4, pool))


def _mask(ch):
    m = torch.zeros(B, HK, D)
    return m.scatter_(-1, ch[:, :, 0], 1.0)


def test_decode_logits_equal_masked_reference_on_old_and_full_on_recent():
    """Old tokens: (q * m) . k^T; the last ``recent`` prompt tokens and the new one: q . k^T (scale 1/sqrt(D))."""
    T, recent, keep = 10, 3, 5
    q, k, v, q_pos = _batch(T)
    narrow, ch, k_full, _, _ = _prefill(q, k, v, q_pos, q_pos, keep, recent)
    assert narrow.shape == (B, HK, T - recent, keep) and k_full.shape == (B, HK, recent, D)
    g = torch.Generator().manual_seed(1)
    q1, k1 = torch.randn(B, H, 1, D, generator=g), torch.randn(B, HK, 1, D, generator=g)
    full = torch.cat([k_full, k1], 2)
    n2, ch2, kf2, _, _ = think_prune(q1, full, narrow, ch, full, v, q_pos[:, -1:] + 1, q_pos, keep, recent, 4, "mean")
    assert torch.equal(n2, narrow) and torch.equal(ch2, ch) and torch.equal(kf2, full)  # decode: the split stays
    keys = torch.cat([think_expand(narrow, ch, D), full], 2).repeat_interleave(G, 1)
    got = (q1 @ keys.transpose(-1, -2)) / D ** 0.5
    m = _mask(ch).repeat_interleave(G, 1)[:, :, None, :]  # [B, H, 1, D]
    k_h = torch.cat([k, k1], 2).repeat_interleave(G, 1)
    old = ((q1 * m) @ k_h[:, :, :T - recent].transpose(-1, -2)) / D ** 0.5
    new = (q1 @ k_h[:, :, T - recent:].transpose(-1, -2)) / D ** 0.5
    torch.testing.assert_close(got, torch.cat([old, new], -1), rtol=0, atol=1e-6)
    assert (got[..., :T - recent] - (q1 @ k_h[:, :, :T - recent].transpose(-1, -2)) / D ** 0.5).abs().max() > 1e-3  # really pruned


def test_zero_query_energy_channels_are_pruned_without_changing_logits():
    zero = [1, 4, 6]
    q, k, v, q_pos = _batch()
    q[..., zero] = 0.0
    narrow, ch, k_full, _, _ = _prefill(q, k, v, q_pos, q_pos, D - len(zero), recent=2)
    assert torch.equal(ch[:, :, 0], torch.tensor([c for c in range(D) if c not in zero]).expand(B, HK, -1))
    q1 = torch.randn(B, H, 1, D)
    q1[..., zero] = 0.0
    keys = torch.cat([think_expand(narrow, ch, D), k_full], 2).repeat_interleave(G, 1)
    dense = q1 @ k.repeat_interleave(G, 1).transpose(-1, -2)
    torch.testing.assert_close(q1 @ keys.transpose(-1, -2), dense, rtol=0, atol=1e-6)


def test_keep_all_channels_round_trips_the_keys():
    q, k, v, q_pos = _batch()
    narrow, ch, k_full, v2, kp2 = _prefill(q, k, v, q_pos, q_pos, D, recent=4)
    assert torch.equal(ch[:, :, 0], torch.arange(D).expand(B, HK, -1))
    assert torch.equal(torch.cat([think_expand(narrow, ch, D), k_full], 2), k)
    assert torch.equal(v2, v) and torch.equal(kp2, q_pos)


def test_per_head_cache_is_right_aligned_before_the_split():
    """A compacted per-head cache (kept tokens first, -1 padding after): the last ``recent`` real tokens stay full."""
    q, k, v, q_pos = _batch(T=6, pad=0)
    k_pos = torch.tensor([[0, 2, 4, 5, -1, -1], [1, 2, 3, 4, 5, -1]]).expand(B, HK, 6).clone()
    narrow, ch, k_full, v2, kp2 = _prefill(q, k, v, q_pos, k_pos, 4, recent=2)
    assert torch.equal(kp2[0, 0], torch.tensor([-1, -1, 0, 2, 4, 5])) and torch.equal(kp2[0, 1], torch.tensor([-1, 1, 2, 3, 4, 5]))
    assert torch.equal(k_full[0, 0], k[0, 0, 2:4]) and torch.equal(k_full[0, 1], k[0, 1, 3:5])
    assert torch.equal(v2[0, 1, 1:], v[0, 1, :5])
    assert torch.equal(narrow[0, 0, 2:], k[0, 0, :2, ch[0, 0, 0]])


def test_bad_keep_is_refused_naming_the_range():
    q, k, v, q_pos = _batch()
    with pytest.raises(ValueError, match=r"keep must be a channel count in \[1, 8\]"):
        think_prune_reference(q, k, *_empty(k), k, v, q_pos, q_pos, 9, 2, 4, "mean")
    with pytest.raises(ValueError, match="pool must be one of"):
        think_prune_reference(q, k, *_empty(k), k, v, q_pos, q_pos, 4, 2, 4, "sum")
