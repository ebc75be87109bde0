"""H2O prompt scores over the causal key range (``codegen/torch/prefill_scores.py``) equal the reference bit for bit."""

from __future__ import annotations

import pytest
import torch

from graphwright.codegen.torch.prefill_scores import causal_prompt, h2o_prompt, prompt_colsum
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction_ref import colsum, h2o_reference
from graphwright.passes.base import PassContext
from graphwright.passes.h2o import H2O
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, decode_loop, state_of


def prompt(B, H, Hk, T, D, pads, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, T, D, generator=g) * 2, torch.randn(B, Hk, T, D, generator=g) * 2
    q_pos = torch.arange(T).repeat(B, 1)
    for b, pad in enumerate(pads):
        q_pos[b] = torch.arange(T) - pad
        q_pos[b, :pad] = -1
    return q, k, q_pos, q_pos[:, None].expand(B, Hk, T).contiguous()


@pytest.mark.parametrize("T,H,Hk,D", [(700, 9, 3, 64), (513, 2, 1, 32), (256, 4, 2, 16), (300, 6, 2, 24), (40, 4, 2, 8)])
@pytest.mark.parametrize("pads", [(0, 37), (0, 0)])  # left padding: the reference's mask; none: the causal tile only
def test_prompt_colsum_is_the_reference_bit_for_bit(T, H, Hk, D, pads):
    q, k, q_pos, k_pos = prompt(2, H, Hk, T, D, pads, seed=T)
    assert causal_prompt(q_pos, k_pos)
    got, want = prompt_colsum(q, k, q_pos, k_pos, 0.125), colsum(q, k, q_pos, k_pos, 0.125)
    assert torch.equal(got, want)
    assert got[1, :, :pads[1]].abs().sum() == 0 and got[0].min() > 0  # padding keys get nothing, real ones something


def test_prompt_colsum_with_key_bias_is_the_reference():
    for pads in ((5, 0), (0, 0)):
        q, k, q_pos, k_pos = prompt(2, 4, 2, 600, 16, pads, seed=1)
        bias = torch.randn(2, 4, 600)
        assert torch.equal(prompt_colsum(q, k, q_pos, k_pos, 0.25, bias), colsum(q, k, q_pos, k_pos, 0.25, bias))


def test_not_a_causal_prompt_falls_back_to_the_reference():
    q, k, q_pos, k_pos = prompt(1, 4, 2, 300, 16, (0,), seed=2)
    shuffled = k_pos.flip(-1)  # keys not in position order: later slots are visible
    assert not causal_prompt(q_pos, shuffled)
    assert not causal_prompt(q_pos, k_pos[..., :299])  # a cache before the prompt
    assert not causal_prompt(torch.tensor([[0, 5, -1, 3]]), torch.tensor([[[0, 5, -1, 3]]]))  # 3 after 5
    assert torch.equal(prompt_colsum(q, k, q_pos, shuffled, 0.25), colsum(q, k, q_pos, shuffled, 0.25))


@pytest.mark.parametrize("pads", [(0, 100), (0, 0)])
def test_h2o_prompt_keeps_the_reference_sets_and_scores(pads):
    q, k, q_pos, k_pos = prompt(2, 4, 2, 600, 16, pads, seed=3)
    v = torch.randn(2, 2, 600, 16)
    score = torch.zeros(2, 2, 0)
    got = h2o_prompt(q, k, v, q_pos, k_pos, score, 0.25, 40, 0.0, 20, 0.0)
    want = h2o_reference(q, k, v, q_pos, k_pos, score, 0.25, 40, 0.0, 20, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[2].shape[-1] == 60


def test_h2o_prefill_in_the_model_equals_the_reference_backend(compiled_tiny):
    """A 600-token left-padded batch (3 blocks of query rows): the torch backend's state after prefill and 20
    decode steps equals the compacting references' (kept positions and running scores)."""
    sg = H2O(heavy=48, recent=16).run(compiled_tiny("tiny-llama").step_graph.copy(), PassContext())
    fast, ref = CompiledModel(sg, backend="torch"), CompiledModel(sg, backend=COMPACTING)
    ids, mask = left_padded_batch(256, [600, 450], seed=7)
    seen = {}

    def keep(name, cm):
        return lambda i, s: seen.setdefault(name, []).append(
            [state_of(cm, s, n).clone() for n in ("key_positions0", "attn_score0", "key_positions1")])

    got, _, _ = decode_loop(fast, ids, mask, 20, keep("fast", fast))
    want, _, _ = decode_loop(ref, ids, mask, 20, keep("ref", ref))
    a, b = seen["fast"][0], seen["ref"][0]  # after prefill: both compacted, position order
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape[-1] == 64
    for x, y in zip(seen["fast"][1:], seen["ref"][1:]):  # decode on slots: same sets per head
        for kp_x, kp_y in ((x[0], y[0]), (x[2], y[2])):
            assert [[sorted(h[h >= 0].tolist()) for h in row] for row in kp_x] == \
                   [[sorted(h[h >= 0].tolist()) for h in row] for row in kp_y]
    assert (got - want).abs().max() <= 1e-4


def test_h2o_prefill_without_padding_in_the_model_equals_the_reference_backend(compiled_tiny):
    """One unpadded 700-token prompt (the causal-tile path): kept positions and scores after prefill equal the references'."""
    sg = H2O(heavy=0.1, recent=32).run(compiled_tiny("tiny-llama").step_graph.copy(), PassContext())
    fast, ref = CompiledModel(sg, backend="torch"), CompiledModel(sg, backend=COMPACTING)
    ids, mask = left_padded_batch(256, [700], seed=8)
    states = []
    for cm in (fast, ref):
        _, _, state = decode_loop(cm, ids, mask, 0)
        states.append([state_of(cm, state, n) for n in ("key_positions0", "attn_score0", "key_positions1", "attn_score1")])
    assert all(torch.equal(a, b) for a, b in zip(*states))
    assert states[0][0].shape[-1] == 70 + 32
