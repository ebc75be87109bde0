"""graphwright.rerotate_keys (kvpress KeyRerotationPress): kept post-RoPE keys moved to positions 0..n-1."""

from __future__ import annotations

import cmath

import torch

from graphwright.ops.rerotate import REROTATE_KEYS, ranks, rerotate_keys_reference
from graphwright.ops.rope_index_ref import _rotate, rope_angles


def holey(B=2, Hk=3, S=11, seed=0):
    """Per (row, head) increasing positions with holes (earlier evictions) and left padding (-1), in slot order."""
    g = torch.Generator().manual_seed(seed)
    k_pos = torch.full((B, Hk, S), -1, dtype=torch.long)
    for b in range(B):
        for h in range(Hk):
            pos = sorted(torch.randperm(3 * S, generator=g)[:S - 2 * b].tolist())
            k_pos[b, h, 2 * b:] = torch.tensor(pos)
            k_pos[b, h, 2 * b + int(torch.randint(0, S - 2 * b, (1,), generator=g))] = -1  # one emptied slot
    return k_pos


def oracle(k, k_pos, inv_freq):
    """Per slot, by loops in float64: j = the count of the head's valid slots at earlier positions; each dim pair
    (i, i + R/2) rotated as the complex number x_i + i x_{i+R/2} times exp(i (j - p) inv_freq[i])."""
    B, Hk, S, D = k.shape
    half = inv_freq.shape[0]
    out, new = k.double().clone(), torch.full_like(k_pos, -1)
    for b in range(B):
        for h in range(Hk):
            valid = [int(p) for p in k_pos[b, h] if p >= 0]
            for s in range(S):
                p = int(k_pos[b, h, s])
                if p < 0:
                    continue
                j = sum(1 for q in valid if q < p)
                new[b, h, s] = j
                for i in range(half):
                    z = complex(float(k[b, h, s, i]), float(k[b, h, s, i + half]))
                    z *= cmath.exp(1j * (j - p) * float(inv_freq[i]))
                    out[b, h, s, i], out[b, h, s, i + half] = z.real, z.imag
    return out, new


def test_equals_the_loop_oracle_with_holes_padding_and_partial_rotary():
    g = torch.Generator().manual_seed(1)
    k_pos = holey()
    for D, half in ((8, 4), (12, 3)):  # full rotary; partial (R = 6 of 12 dims)
        k = torch.randn(2, 3, 11, D, generator=g)
        inv = 1.0 / (50.0 ** (torch.arange(half).float() / half))
        got_k, got_pos = rerotate_keys_reference(k, k_pos, inv)
        want_k, want_pos = oracle(k, k_pos, inv)
        assert torch.equal(got_pos, want_pos)
        assert (got_k.double() - want_k).abs().max() <= 2e-5
        assert torch.equal(got_k[..., 2 * half:], k[..., 2 * half:])  # dims past the rotary part pass through
        assert (got_k - k).abs().max() > 0.1  # keys really moved


def test_rerotated_rope_keys_are_the_rope_keys_at_the_new_positions():
    """RoPE(x, p) re-rotated by (j - p) is RoPE(x, j): the key the model computes at position j (fp32, scaling kept)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 9, 8, generator=g)
    k_pos = holey(B=1, Hk=2, S=9, seed=3)
    inv = 1.0 / (10000.0 ** (torch.arange(4).float() / 4))
    scaling = 1.3  # transformers' attention_scaling, in the cached key, never applied twice
    cos, sin = rope_angles(k_pos, inv)
    k = _rotate(x, cos, sin, scaling)
    got, new = rerotate_keys_reference(k, k_pos, inv)
    cos_j, sin_j = rope_angles(new, inv)
    want = _rotate(x, cos_j, sin_j, scaling)
    valid = k_pos >= 0
    assert (got - want)[valid].abs().max() <= 1e-5


def test_new_positions_are_ranks_by_position_not_slot_order():
    k_pos = holey(seed=4)
    perm = torch.randperm(k_pos.shape[-1], generator=torch.Generator().manual_seed(5))
    k = torch.randn(*k_pos.shape, 8)
    inv = torch.rand(4) + 0.1
    a_k, a_pos = rerotate_keys_reference(k, k_pos, inv)
    b_k, b_pos = rerotate_keys_reference(k[:, :, perm], k_pos[:, :, perm], inv)
    assert torch.equal(b_pos, a_pos[:, :, perm])
    assert (b_k - a_k[:, :, perm]).abs().max() <= 1e-6
    for b in range(2):
        for h in range(3):
            n = int((k_pos[b, h] >= 0).sum())
            assert sorted(int(p) for p in ranks(k_pos)[b, h] if p >= 0) == list(range(n))


def test_positions_already_0_to_n_minus_1_are_the_identity_bit_for_bit():
    """Exact setting (nothing evicted, or a decode step after a re-rotated prefill): the inputs come back."""
    k_pos = torch.arange(7).expand(2, 3, 7).clone()
    k_pos[1, :, :2] = -1  # left padding: row 1 holds 0..4 after two empty slots
    k_pos[1, :, 2:] = torch.arange(5)
    k = torch.randn(2, 3, 7, 8)
    inv = torch.rand(4)
    got_k, got_pos = rerotate_keys_reference(k, k_pos, inv)
    assert got_k is k and got_pos is k_pos
    op_k, op_pos = REROTATE_KEYS(k, k_pos, inv)  # the custom op copies (it may not alias its inputs)
    assert torch.equal(op_k, k) and torch.equal(op_pos, k_pos) and op_k is not k
    # the rotation by 0 itself is the identity bit for bit: a general call on a cache that also needs a move
    moved = k_pos.clone()
    moved[0, 0] = torch.arange(7) + torch.tensor([0, 0, 0, 1, 1, 1, 1])  # head (0, 0): a hole at position 3
    full_k, full_pos = rerotate_keys_reference(k, moved, inv)
    assert torch.equal(full_k[1], k[1]) and torch.equal(full_pos[1], k_pos[1])
    assert torch.equal(full_k[0, 0, :3], k[0, 0, :3]) and not torch.equal(full_k[0, 0, 3:], k[0, 0, 3:])
