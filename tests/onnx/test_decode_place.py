"""Op-level checks of the node-saving forms in ``codegen/onnx/decode_slots.py`` against the general ones.

``place_at`` (scatter into the first S slots) against ``place`` (scatter into S + 1, then cut) for victims
below S; the one-ArgMin ``streaming_decode`` against (hit.any, first hit, first empty, earliest) through ``place``;
``export_colsum`` (4-D MatMul) against the torch backend's ``decode_colsum``. Random slot layouts with empty
slots, full heads, a padding row (q_pos -1) and key biases; the model-level invariants (kept sets, logits,
tokens against the torch backend) are in ``test_onnx_eviction_slots.py`` / ``test_onnx_streaming_shift.py``.
"""

import torch

from graphwright.codegen.onnx.decode_slots import _first, export_colsum, first_empty, place, place_at, streaming_decode
from graphwright.codegen.torch.eviction_slots import decode_colsum


def _layout(gen, B=3, Hk=2, S=7, D=4, empty=0.3):
    """k, v [B, Hk, S+1, D], k_pos [B, Hk, S+1] (unique positions per head, some empty, the new token at slot S)."""
    k, v = torch.randn(B, Hk, S + 1, D, generator=gen), torch.randn(B, Hk, S + 1, D, generator=gen)
    L = 40
    pos = torch.stack([torch.stack([torch.randperm(L - 1, generator=gen)[:S] for _ in range(Hk)]) for _ in range(B)])
    pos = torch.where(torch.rand(B, Hk, S, generator=gen) < empty, -1, pos)
    q_pos = torch.full((B, 1), L - 1)
    q_pos[-1] = -1  # a padding row
    k_pos = torch.cat([pos, q_pos[:, :, None].expand(B, Hk, 1)], 2)
    return k, v, k_pos, q_pos


def test_place_at_equals_place_for_victims_below_S():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        k, v, k_pos, _ = _layout(gen, empty=0.5 if trial % 2 else 0.0)
        S = k_pos.shape[2] - 1
        score = torch.rand(k_pos.shape, generator=gen)
        over = torch.rand(k_pos.shape[:2], generator=gen) < 0.5
        victim = torch.randint(0, S, k_pos.shape[:2], generator=gen)
        want = place((k, v, k_pos, score), k_pos, over, victim)
        got = place_at((k, v, k_pos, score), torch.where(over, victim, first_empty(k_pos)))
        for w, g in zip(want, got):
            assert g.shape == w.shape and torch.equal(g, w)


def test_streaming_one_argmin_equals_hit_then_first_empty_then_earliest():
    gen = torch.Generator().manual_seed(1)
    hits = fulls = 0
    for trial in range(80):
        k, v, k_pos, q_pos = _layout(gen, empty=(0.0, 0.2, 0.6)[trial % 3])
        sinks, window = int(trial % 4), 1 + int(trial % 9)
        old = (q_pos.max(dim=1).values - window)[:, None, None]
        hit = (k_pos == old) & (old >= sinks)
        hits += int(hit.sum())
        S = k_pos.shape[2] - 1
        # neither the leaving position nor an empty slot (a state StreamingLLM never reaches: a head holds at most
        # sinks + window tokens): the slot of the earliest position (decode_slots.streaming_slot)
        full = ~hit.any(dim=-1) & ~(k_pos[..., :S] < 0).any(dim=-1)
        fulls += int(full.sum())
        victim = torch.where(hit.any(dim=-1), _first(hit), k_pos[..., :S].argmin(dim=-1))
        want = place((k, v, k_pos), k_pos, hit.any(dim=-1) | full, victim)
        got = streaming_decode(k, v, q_pos, k_pos, sinks, window)
        for w, g in zip(want, got):
            assert torch.equal(g, w)
    assert hits > 0 and fulls > 0  # the layouts hold the leaving position sometimes, and neither it nor an empty slot


def test_export_colsum_equals_decode_colsum():
    gen = torch.Generator().manual_seed(2)
    B, H, Hk, D = 3, 6, 2, 8
    for with_bias in (False, True):
        k, _, k_pos, q_pos = _layout(gen, B=B, Hk=Hk, D=D)
        q = torch.randn(B, H, 1, D, generator=gen)
        bias = torch.randn(B, H, 1, k.shape[2], generator=gen) if with_bias else None
        want = decode_colsum(q, k, q_pos, k_pos, 0.35, bias)
        got = export_colsum(q, k, q_pos, k_pos, 0.35, bias)
        assert got.shape == want.shape == k_pos.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert torch.all(got[:-1][k_pos[:-1] < 0] == 0) and torch.all(got[-1] == 0)  # empty slots and the padding row get 0
