"""Op-level and graph-level checks of ``codegen/onnx/decode_rows.py`` against the general forms.

``h2o_attend_rows`` (one decomposed attention whose probabilities feed the running score, on old slots + new
row) against ``attention_reference`` + ``decode_slots.h2o_decode`` on the S + 1 concatenation;
``streaming_rows`` against ``streaming_decode``. Random slot layouts with empty slots, full heads, tied
scores, a padding row (q_pos -1), key biases, token and fraction budgets. The rewrite of a tiny Llama's
decode graph: no attention node left in its H2O layers, its eager run equals the unrewritten graph's.
The model-level invariants (kept sets, logits, tokens against the torch backend through ONNX Runtime) are
in ``test_onnx_eviction_slots.py`` / ``test_onnx_streaming_shift.py``.
"""

import math

import pytest
import torch

import graphwright as gw
from graphwright.capture.ops import ATTENTION, attention_reference
from graphwright.codegen.onnx import decode_slots
from graphwright.codegen.onnx.decode_rows import (
    back_rotation,
    h2o_attend_rows,
    key_positions,
    rows_at,
    sink_index,
    sink_keys,
    sink_keys_at,
    sink_rotation,
    slot_attention,
    slot_index,
    streaming_attend_rows,
    streaming_attend_slots,
    streaming_rows,
)
from graphwright.codegen.onnx.decode_slots import decode_graph, h2o_decode, streaming_decode, streaming_slot
from graphwright.codegen.onnx.streaming_shift import rotation_matrix, shifted_decode_attention
from graphwright.ops.rope_index_ref import _rotate, rope_angles


def _rows(gen, B=3, Hk=2, S=7, D=4, empty=0.3, L=40):
    """Old state k, v [B, Hk, S, D], k_pos [B, Hk, S] (unique positions < L - 1 per head, some empty) and the
    new row k, v [B, Hk, 1, D], k_pos [B, Hk, 1] at the query's position q_pos [B, 1] (the last row pads: -1)."""
    k, v = torch.randn(B, Hk, S, D, generator=gen), torch.randn(B, Hk, S, D, generator=gen)
    pos = torch.stack([torch.stack([torch.randperm(L - 1, generator=gen)[:S] for _ in range(Hk)]) for _ in range(B)])
    pos = torch.where(torch.rand(B, Hk, S, generator=gen) < empty, -1, pos)
    q_pos = torch.full((B, 1), L - 1)
    q_pos[-1] = -1
    new = (torch.randn(B, Hk, 1, D, generator=gen), torch.randn(B, Hk, 1, D, generator=gen), q_pos[:, :, None].expand(B, Hk, 1))
    return (k, v, pos), new, q_pos


BUDGETS = [(3, 0.0, 2, 0.0), (2, 0.0, 1, 0.0), (1, 0.1, 1, 0.05), (0, 0.0, 4, 0.0)]  # heavy_n, heavy_f, recent_n, recent_f


@pytest.mark.parametrize("budget", BUDGETS)
def test_h2o_attend_rows_equals_attention_and_h2o_decode(budget):
    gen = torch.Generator().manual_seed(sum(int(x * 100) for x in budget))
    B, H, Hk, D, S = 3, 6, 2, 8, 7
    evictions = 0
    for trial in range(40):
        (k, v, kp), (kn, vn, kpn), q_pos = _rows(gen, B=B, Hk=Hk, S=S, D=D, empty=(0.0, 0.2, 0.6)[trial % 3])
        q = torch.randn(B, H, 1, D, generator=gen)
        score = torch.randint(0, 3, (B, Hk, S), generator=gen).float() / 4  # ties
        bias = torch.randn(B, H, S + 1, generator=gen) if trial % 4 == 3 else None
        ka, va, kpa = torch.cat([k, kn], 2), torch.cat([v, vn], 2), torch.cat([kp, kpn], 2)
        want_out = attention_reference(q, ka, va, q_pos, kpa, 0.35, key_bias=bias)
        want = h2o_decode(q, ka, va, q_pos, kpa, score, 0.35, *budget, key_bias=bias)
        got = h2o_attend_rows(q, k, kn, v, vn, q_pos, kp, kpn, score, 0.35, *budget, key_bias=bias)
        torch.testing.assert_close(got[0], want_out, rtol=1e-6, atol=1e-6)
        for w, g in zip(want, got[1:]):
            assert g.shape == w.shape and g.dtype == w.dtype
        for w, g in zip(want[:3], got[1:4]):
            assert torch.equal(g, w)
        torch.testing.assert_close(got[4], want[3], rtol=1e-6, atol=1e-7)
        evictions += int(((kp >= 0).all(-1) & (got[3] != kp).any(-1))[:-1].sum())
    assert evictions > 0  # full heads did evict


def test_h2o_attend_rows_refuses_a_leaving_new_token():
    (k, v, kp), (kn, vn, kpn), q_pos = _rows(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="recent_n >= 1"):
        h2o_attend_rows(torch.zeros(3, 2, 1, 4), k, kn, v, vn, q_pos, kp, kpn, torch.zeros(kp.shape), 1.0, 4, 0.0, 0, 0.0)


def test_streaming_rows_equals_streaming_decode():
    gen = torch.Generator().manual_seed(1)
    moved = 0
    for trial in range(80):
        (k, v, kp), (kn, vn, kpn), q_pos = _rows(gen, empty=(0.0, 0.2, 0.6)[trial % 3])
        sinks, window = int(trial % 4), 1 + int(trial % 9)
        want = streaming_decode(torch.cat([k, kn], 2), torch.cat([v, vn], 2), q_pos, torch.cat([kp, kpn], 2), sinks, window)
        got = streaming_rows(k, kn, v, vn, q_pos, kp, kpn, sinks, window)
        for w, g in zip(want, got):
            assert torch.equal(g, w)
        moved += int((got[2] != kp).sum())
    assert moved > 0
    with pytest.raises(ValueError, match="window >= 1"):
        streaming_rows(k, kn, v, vn, q_pos, kp, kpn, 2, 0)


def test_streaming_slot_is_the_leaving_tokens_slot_else_the_first_empty_one():
    """``streaming_slot`` against its definition, written out per head: the slot holding position L - 1 - window
    when that position is >= sinks, else the first empty slot; a head with neither (never reached by a
    consistent state) gets the slot of its earliest position."""
    gen = torch.Generator().manual_seed(11)
    seen = {"hit": 0, "empty": 0, "neither": 0}
    for trial in range(120):
        (_, _, kp), _, q_pos = _rows(gen, S=6, L=20, empty=(0.0, 0.2, 0.6)[trial % 3])
        sinks, window = int(trial % 5), 1 + int(trial % 13)
        got = streaming_slot(kp, q_pos, sinks, window)
        assert got.shape == (*kp.shape[:2], 1)
        for b in range(kp.shape[0]):
            old = int(q_pos[b].max()) - window
            for h in range(kp.shape[1]):
                row = kp[b, h].tolist()
                if old >= sinks and old in row:
                    want, case = row.index(old), "hit"
                elif -1 in row:
                    want, case = row.index(-1), "empty"
                else:
                    want, case = row.index(min(row)), "neither"
                assert int(got[b, h, 0]) == want, (trial, b, h, row, old)
                seen[case] += 1
    assert min(seen.values()) > 0, seen


@pytest.mark.parametrize("evicted", [False, True])
def test_streaming_attend_rows_equals_shifted_attention_and_streaming_decode(evicted):
    """One function on (old slots, new row) = ``shifted_decode_attention`` on the concatenation (1e-6) and the
    state ``streaming_decode`` writes (exactly); the back rotation comes from ``back_rotation``."""
    gen = torch.Generator().manual_seed(7 + evicted)
    B, H, Hk, D, S, R = 3, 6, 2, 16, 9, 8
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    moved = 0
    for trial in range(40):
        sinks, window = int(trial % 4), 1 + int(trial % 7)
        L = 200 if evicted else sinks + window  # E = L - 1 - sinks - window: > 0, or 0 (nothing evicted yet)
        (k, v, kp), (kn, vn, kpn), q_pos = _rows(gen, B=B, Hk=Hk, S=S, D=D, L=max(L, S + 2), empty=(0.0, 0.2, 0.6)[trial % 3])
        q = torch.randn(B, H, 1, D, generator=gen) * 2
        bias = torch.randn(B, H, S + 1, generator=gen) if trial % 4 == 3 else None
        ka, va, kpa = torch.cat([k, kn], 2), torch.cat([v, vn], 2), torch.cat([kp, kpn], 2)
        want_out = shifted_decode_attention(q, ka, va, q_pos, kpa, 0.3, bias, inv, sinks, window)
        want = streaming_decode(ka, va, q_pos, kpa, sinks, window)
        rot = back_rotation(q, q_pos, inv, sinks, window)
        got = streaming_attend_rows(q, k, kn, v, vn, q_pos, kp, kpn, 0.3, bias, rot, sinks, window)
        torch.testing.assert_close(got[0], want_out, rtol=1e-6, atol=1e-6)
        for w, g in zip(want, got[1:]):
            assert g.dtype == w.dtype and torch.equal(g, w)
        moved += int((got[3] != kp).sum())
    assert moved > 0
    with pytest.raises(ValueError, match="window >= 1"):
        streaming_attend_rows(q, k, kn, v, vn, q_pos, kp, kpn, 0.3, None, rot, 2, 0)


@pytest.mark.parametrize("evicted", [False, True])
def test_sink_keys_attention_equals_shifted_attention(evicted):
    """``SINK_KEYS``: the plain attention (``attention_reference``, what ONNX's fused Attention computes) over
    ``sink_keys`` (sinks rotated forward by E, ``sink_rotation``) and the new row = ``shifted_decode_attention``
    on the concatenation (1e-5; random slot states: empty slots, padding rows, absent sinks where E = 0; the sinks in
    random slots where E > 0, StreamingLLM's invariant, ``sink_keys``); every slot not
    holding a sink position is returned bit for bit, and in a row with E = 0 every key is."""
    gen = torch.Generator().manual_seed(11 + evicted)
    B, H, Hk, D, S, R = 3, 6, 2, 16, 9, 8
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    rotated = 0
    for trial in range(40):
        sinks, window = int(trial % 4), 1 + int(trial % 7)
        L = 200 if evicted else sinks + window
        (k, v, kp), (kn, vn, kpn), q_pos = _rows(gen, B=B, Hk=Hk, S=S, D=D, L=max(L, S + 2), empty=(0.0, 0.2, 0.6)[trial % 3])
        if q_pos.max() - sinks - window > 0:  # a row that has evicted holds its sinks (StreamingLLM's invariant)
            for b in range(B):
                for h in range(Hk):
                    kp[b, h][kp[b, h] < sinks] = -1  # positions stay unique per head
                    kp[b, h, torch.randperm(S, generator=gen)[:sinks]] = torch.arange(sinks, dtype=kp.dtype)
        q = torch.randn(B, H, 1, D, generator=gen) * 2
        bias = torch.randn(B, H, S + 1, generator=gen) if trial % 4 == 3 else None
        ka, va, kpa = torch.cat([k, kn], 2), torch.cat([v, vn], 2), torch.cat([kp, kpn], 2)
        want = shifted_decode_attention(q, ka, va, q_pos, kpa, 0.3, bias, inv, sinks, window)
        ks = sink_keys(k, kp, sink_rotation(q, q_pos, inv, sinks, window), sinks)
        got = attention_reference(q, torch.cat([ks, kn], 2), va, q_pos, kpa, 0.3, key_bias=bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        sink = ((kp >= 0) & (kp < sinks))[..., None].expand_as(k)
        assert torch.equal(ks[~sink], k[~sink])
        still = (q_pos[:, 0] - sinks - window) <= 0  # E = 0: R(0) is the identity, every key returned bit for bit
        assert torch.equal(ks[still], k[still])
        rotated += int((ks != k).any(-1).sum())
    assert rotated > 0


def test_sink_rotation_is_the_back_rotations_inverse():
    gen = torch.Generator().manual_seed(2)
    D, R = 16, 8
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    q, q_pos = torch.randn(3, 4, 1, D, generator=gen), torch.tensor([[5], [90], [-1]])
    fwd, back = sink_rotation(q, q_pos, inv, 2, 3), back_rotation(q, q_pos, inv, 2, 3)
    assert fwd.shape == (3, 1, D, D)
    torch.testing.assert_close(fwd @ back, torch.eye(D).expand(3, 1, D, D), rtol=0, atol=1e-6)
    assert torch.equal(fwd[0], torch.eye(D)[None]) and torch.equal(fwd[2], torch.eye(D)[None])  # E = 0: the identity


def _shared_rows(gen, trial, sinks, window, evicted, B, Hk, S, D):
    """``_rows`` with one position row per batch row, every head the same, and (StreamingLLM's invariant) every row
    that has evicted holding its sinks, in random slots."""
    L = 200 if evicted else sinks + window
    (k, v, kp), new, q_pos = _rows(gen, B=B, Hk=Hk, S=S, D=D, L=max(L, S + 2), empty=(0.0, 0.2, 0.6)[trial % 3])
    kp = kp[:, :1].expand(B, Hk, S).clone()
    if q_pos.max() - sinks - window > 0:
        for b in range(B):
            row = kp[b, 0].clone()
            row[row < sinks] = -1
            row[torch.randperm(S, generator=gen)[:sinks]] = torch.arange(sinks, dtype=kp.dtype)
            kp[b] = row
    return (k, v, kp), new, q_pos


@pytest.mark.parametrize("evicted", [False, True])
def test_shared_rows_equal_the_per_layer_functions(evicted):
    """``SHARED_ROWS``: on StreamingLLM states whose heads hold the same positions (its invariant), the step's
    ``slot_index`` + ``rows_at`` = ``streaming_rows``, ``sink_index`` + ``sink_keys_at`` = ``sink_keys`` (bit for
    bit), and the plain attention with ``key_positions`` [B, S + 1] = the one with per-head positions (1e-6):
    random slot layouts with empty slots, sinks in random slots, a padding row (q_pos -1)."""
    gen = torch.Generator().manual_seed(5 + evicted)
    B, H, Hk, D, S, R = 3, 6, 2, 16, 9, 8
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    for trial in range(30):
        sinks, window = int(trial % 3), 1 + int(trial % 7)
        (k, v, kp), (kn, vn, kpn), q_pos = _shared_rows(gen, trial, sinks, window, evicted, B, Hk, S, D)
        j, jd = slot_index(kp, q_pos, sinks, window, D)
        for got, want in zip(rows_at(k, kn, v, vn, kp, kpn, j, jd), streaming_rows(k, kn, v, vn, q_pos, kp, kpn, sinks, window)):
            assert torch.equal(got, want)
        rot = sink_rotation(torch.zeros(B, H, 1, D), q_pos, inv, sinks, window)
        ks = sink_keys_at(k, sink_index(kp, sinks, D), rot)
        assert torch.equal(ks, sink_keys(k, kp, rot, sinks))
        q = torch.randn(B, H, 1, D, generator=gen) * 2
        kc, vc = torch.cat([ks, kn], 2), torch.cat([v, vn], 2)
        shared = attention_reference(q, kc, vc, q_pos, key_positions(kp, kpn), 0.3)
        torch.testing.assert_close(shared, attention_reference(q, kc, vc, q_pos, torch.cat([kp, kpn], 2), 0.3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("evicted", [False, True])
def test_streaming_attend_slots_equals_the_fused_attention_and_rows_at(evicted):
    """``SPLIT_ROWS``: ``streaming_attend_slots`` (old slots read in place, the sinks scored from their rotated keys and
    written over their slots' scores, the row written after) = the ``SINK_KEYS`` graph it replaces: the plain attention
    over ``sink_keys_at`` + the new row (1e-5) and ``rows_at``'s next state bit for bit. States as
    ``test_shared_rows_equal_the_per_layer_functions``'s (empty slots, sinks in random slots, a padding row), key
    biases on some trials."""
    gen = torch.Generator().manual_seed(21 + evicted)
    B, H, Hk, D, S, R = 3, 6, 2, 16, 9, 8
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    rotated = 0
    for trial in range(30):
        sinks, window = 1 + int(trial % 3), 1 + int(trial % 7)
        (k, v, kp), (kn, vn, kpn), q_pos = _shared_rows(gen, trial, sinks, window, evicted, B, Hk, S, D)
        q = torch.randn(B, H, 1, D, generator=gen) * 2
        bias = torch.randn(B, H, S + 1, generator=gen) if trial % 4 == 3 else None
        j, jd = slot_index(kp, q_pos, sinks, window, D)
        idx = sink_index(kp, sinks, D)
        rot = sink_rotation(q, q_pos, inv, sinks, window)
        ks = sink_keys_at(k, idx, rot)
        want = attention_reference(q, torch.cat([ks, kn], 2), torch.cat([v, vn], 2), q_pos, key_positions(kp, kpn), 0.3,
                                   key_bias=bias)
        got = streaming_attend_slots(q, k, kn, v, vn, kp, kpn, idx, rot, j, 0.3, bias)
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got[1:], rows_at(k, kn, v, vn, kp, kpn, j, jd)):
            assert torch.equal(g, w)
        rotated += int((ks != k).any(-1).sum())
    assert rotated > 0 or not evicted


def test_after_is_the_index_whatever_the_output_holds():
    """``after``: the index unchanged (a zero added), for finite, infinite and NaN outputs alike."""
    from graphwright.codegen.onnx.decode_rows import after

    j = torch.tensor([[[3], [0]], [[1], [2]]])
    for fill in (0.5, float("inf"), float("-inf"), float("nan")):
        assert torch.equal(after(j, torch.full((2, 4, 1, 8), fill)), j)


@pytest.mark.parametrize("budget", BUDGETS[:3])
def test_h2o_attend_rows_split_equals_the_concatenation(budget, monkeypatch):
    """``SPLIT_ROWS`` on and off: ``h2o_attend_rows`` gives the same output (1e-6), running score (1e-6) and K/V /
    positions bit for bit."""
    from graphwright.codegen.onnx import decode_rows

    gen = torch.Generator().manual_seed(7)
    B, H, Hk, D, S = 3, 6, 2, 8, 7
    for trial in range(20):
        (k, v, kp), (kn, vn, kpn), q_pos = _rows(gen, B=B, Hk=Hk, S=S, D=D, empty=(0.0, 0.2, 0.6)[trial % 3])
        q = torch.randn(B, H, 1, D, generator=gen)
        score = torch.randint(0, 3, (B, Hk, S), generator=gen).float() / 4
        args = (q, k, kn, v, vn, q_pos, kp, kpn, score, 0.35, *budget)
        monkeypatch.setattr(decode_rows, "SPLIT_ROWS", False)
        want = h2o_attend_rows(*args)
        monkeypatch.setattr(decode_rows, "SPLIT_ROWS", True)
        got = h2o_attend_rows(*args)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[4], want[4], rtol=1e-6, atol=1e-7)
        for g, w in zip(got[1:4], want[1:4]):
            assert torch.equal(g, w)


def test_slot_attention_equals_the_reference_at_a_decode_step():
    gen = torch.Generator().manual_seed(5)
    B, H, Hk, D, S = 3, 6, 2, 8, 9
    for trial in range(20):
        (k, v, kp), (kn, vn, kpn), q_pos = _rows(gen, B=B, Hk=Hk, S=S, D=D, empty=(0.0, 0.3, 0.9)[trial % 3])
        ka, va, kpa = torch.cat([k, kn], 2), torch.cat([v, vn], 2), torch.cat([kp, kpn], 2)
        q = torch.randn(B, H, 1, D, generator=gen)
        bias = torch.randn(B, H, S + 1, generator=gen) if trial % 2 else None
        want = attention_reference(q, ka, va, q_pos, kpa, 0.3, key_bias=bias)
        torch.testing.assert_close(slot_attention(q, ka, va, kpa, 0.3, bias), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("R, D", [(16, 16), (8, 16), (64, 64)])
def test_rotation_matrix_equals_the_elementwise_rotation(R, D):
    """``streaming_shift.rotation_matrix``: x @ M = ``_rotate(x, cos, -sin)`` (partial rotary: the rest passes through)."""
    gen = torch.Generator().manual_seed(R + D)
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    cos, sin = rope_angles(torch.tensor([0, 5, 1234, -1]), inv)
    x = torch.randn(4, 6, 1, D, generator=gen) * 3
    want = _rotate(x, cos[:, None, None], -sin[:, None, None], 1.0)
    got = torch.matmul(x, rotation_matrix(cos, -sin, D)[:, None])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[..., R:], x[..., R:]) and torch.equal(got[0], x[0])  # pass-through dims; position 0: identity


# recipe -> (function counts in the rewritten decode graph, graphwright.attention nodes left)
REWRITES = {"h2o(heavy=4, recent=4)": ({"h2o_attend_rows": 2, "h2o_decode": 0}, 0),
            # SINK_KEYS (default): the sinks' keys rotated forward, the plain attention op (ONNX's fused Attention)
            # per layer, the slot write; the step's rotation made once for both layers
            # SHARED_ROWS (default): the step's slot, sinks' slots and key positions made once, read by both layers
            # SPLIT_ROWS (default; session 21): each layer's attention reads its old slots in place and scores the
            # sinks from their rotated keys, then writes the new row: one function per layer, no attention op
            "streaming(sinks=2, window=6)": ({"streaming_attend_slots": 2, "sink_rotation": 1, "slot_index": 1,
                                              "sink_index": 1, "key_positions": 0, "sink_keys_at": 0, "rows_at": 0,
                                              "sink_keys": 0, "streaming_rows": 0, "back_rotation": 0,
                                              "streaming_attend_rows": 0, "streaming_decode": 0,
                                              "shifted_decode_attention": 0}, 0),
            # SPLIT_ROWS off: the fused attention over the concatenated, sink-rotated keys, then rows_at (session 20)
            "streaming(sinks=2, window=6) SPLIT_ROWS=False": ({"sink_keys_at": 2, "rows_at": 2, "sink_rotation": 1,
                                                               "slot_index": 1, "sink_index": 1, "key_positions": 1,
                                                               "sink_keys": 0, "streaming_rows": 0, "back_rotation": 0,
                                                               "streaming_attend_rows": 0, "streaming_decode": 0,
                                                               "shifted_decode_attention": 0, "streaming_attend_slots": 0}, 2),
            # SHARED_ROWS off: each layer finds its own slots (session 11's graph)
            "streaming(sinks=2, window=6) SHARED_ROWS=False": ({"sink_keys": 2, "sink_rotation": 1, "streaming_rows": 2,
                                                                "sink_keys_at": 0, "rows_at": 0, "slot_index": 0,
                                                                "back_rotation": 0, "streaming_attend_rows": 0,
                                                                "streaming_decode": 0, "shifted_decode_attention": 0}, 2),
            # SINK_KEYS off: attention + eviction in one function; the step's back rotation made once for both layers
            "streaming(sinks=2, window=6) SINK_KEYS=False": ({"streaming_attend_rows": 2, "back_rotation": 1,
                                                              "streaming_rows": 0, "sink_keys": 0, "streaming_decode": 0,
                                                              "shifted_decode_attention": 0}, 0),
            "snapkv(budget=8, window=2)": ({"slot_attention": 2}, 0),
            # duo's streaming heads: 1 KV head in layer 0, 2 in layer 1 (``decode_rows.heads``): their attention stays fused;
            # DUO_ROWS (default): the slot index made once per streaming head count (two), one key-position row for both
            "duo(retrieval=[[0, 0]], sinks=2, window=4)": ({"rows_at": 2, "slot_index": 2, "key_positions": 1,
                                                            "streaming_rows": 0, "slot_attention": 0}, 3),
            # DUO_ROWS off: each layer finds its own slot, its attention reads per-head positions (session 12's graph)
            "duo(retrieval=[[0, 0]], sinks=2, window=4) DUO_ROWS=False": ({"streaming_rows": 2, "rows_at": 0,
                                                                           "slot_index": 0, "key_positions": 0,
                                                                           "slot_attention": 0}, 3)}


@pytest.mark.parametrize("recipe", list(REWRITES))
def test_rows_rewrite_of_the_decode_graph(recipe, monkeypatch):
    from graphwright.codegen.onnx import decode_rows

    monkeypatch.setattr(decode_rows, "SLOT_ATTENTION", True)  # off by default (decode_rows.py); tested here
    recipe, switch = recipe.rsplit(" ", 1) if recipe.endswith("=False") else (recipe, "")
    monkeypatch.setattr(decode_rows, "SINK_KEYS", switch != "SINK_KEYS=False")
    monkeypatch.setattr(decode_rows, "SHARED_ROWS", switch != "SHARED_ROWS=False")
    monkeypatch.setattr(decode_rows, "DUO_ROWS", switch != "DUO_ROWS=False")
    monkeypatch.setattr(decode_rows, "SPLIT_ROWS", switch != "SPLIT_ROWS=False")
    model, _ = gw.load_model("tiny-llama")
    sg = gw.compile(model, recipe).step_graph
    from graphwright.codegen.onnx.streaming_shift import shift_streaming

    base, _ = shift_streaming(sg.gm, decode=True)
    gm, cap, in_graph, left = decode_graph(base, sg.state)
    monkeypatch.setattr(decode_slots, "ROWS", False)
    ref, cap0, in0, left0 = decode_graph(base, sg.state)
    assert (cap, in_graph, left) == (cap0, in0, left0)
    fns = [getattr(n.target, "__name__", None) for n in gm.graph.nodes if n.op == "call_function"]
    counts, attentions = REWRITES[f"{recipe} {switch}".strip()]
    assert {f: fns.count(f) for f in counts} == counts
    assert sum(n.target is ATTENTION for n in gm.graph.nodes) == attentions
    # one decode step on full and partly empty slot states (batch 2, the second row a padding row: q_pos -1)
    gen = torch.Generator().manual_seed(3)
    B, c = 2, 8
    args = [torch.randint(3, 50, (B, 1), generator=gen), torch.tensor([[11], [-1]]), torch.zeros(1, dtype=torch.long)]
    # StreamingLLM (and duo's streaming heads): one position row per batch row, the same in every head and layer
    streaming_pos = {}  # (their invariant)
    for spec in sg.state:
        shape = [B if d == -1 else d for d in spec.shape]
        shape[spec.seq_dim] = c
        if spec.kind == "positions" and (recipe.startswith("streaming") or len(shape) == 3 and recipe.startswith("duo")):
            # E = 11 - 2 - 6 > 0: each head holds its
            # sinks 0 and 1 (StreamingLLM's invariant, ``decode_rows.sink_keys``), in random slots but the last
            if not streaming_pos:
                r = torch.randperm(9, generator=gen)[:c - 2] + 2
                row = torch.cat([torch.cat([torch.tensor([0, 1]), r[:c - 3]])[torch.randperm(c - 1, generator=gen)], r[c - 3:]])
                t = row.expand(B, 1, c).to(spec.dtype).clone()
                t[1], t[0, ..., -1] = -1, -1  # the padding row holds nothing; row 0 has an empty slot
                streaming_pos["row"] = t
            t = streaming_pos["row"].expand(*shape).clone()
        elif spec.kind == "positions":
            t = torch.stack([torch.randperm(11, generator=gen)[:c] for _ in range(math.prod(shape[:-1]))]).view(shape).to(spec.dtype)
            t[1], t[0, ..., -1] = -1, -1  # the padding row holds nothing; row 0 has an empty slot
        else:
            t = torch.rand(shape, generator=gen).to(spec.dtype)
        args.append(t)
    want, got = ref(*args), gm(*args)
    for w, g in zip(want, got):
        if w.dtype.is_floating_point:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(g, w)
