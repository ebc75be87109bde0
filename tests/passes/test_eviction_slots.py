"""Torch-backend slot eviction (``codegen/torch/eviction_slots.py``) against the compacting references.

The same step graph is lowered twice: the torch backend (slots at decode) and the torch backend
with the eviction references put back (compaction at every step). Both must keep the same set of
positions per (row, KV head) after every step, give logits within 1e-4 (softmax sums in another
order), and the slot version's buffers must stop growing once the budget is reached.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graphwright.codegen.backends import EVICTION_REFERENCES, TORCH
from graphwright.codegen.torch.eviction_slots import decode_colsum, h2o_slots, position_rank, rope_cache_index_ranked, streaming_slots
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction_ref import colsum, h2o_reference, streaming_reference
from graphwright.ops.rope_index_ref import cache_index, rope_cache_index_reference
from graphwright.passes.base import PassContext
from graphwright.passes.h2o import H2O
from graphwright.passes.snapkv import SnapKV
from graphwright.passes.streaming import Streaming
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, op_decode_loop, random_step, state_of

COMPACTING = dataclasses.replace(TORCH, name="torch_compacting", table={**TORCH.table, **EVICTION_REFERENCES})
LENGTHS = [12, 7]  # batch 2, row 1 left-padded by 5


def kept_sets(cm, state, layers=2):
    return [[[sorted(h) for h in row] for row in kept_positions(state_of(cm, state, f"key_positions{layer}"))]
            for layer in range(layers)]


def run_both(cm, p, steps, state_names=("k0", "v0", "key_positions0")):
    """Decode ``steps`` with both lowerings; returns (logits slots, logits compacting, sets per step, storage bytes per step)."""
    sg = p.run(cm.step_graph.copy(), PassContext())
    slots, ref = CompiledModel(sg, backend="torch"), CompiledModel(sg, backend=COMPACTING)
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    sets = {"slots": [], "ref": []}
    nbytes = []

    def on_slots(i, state):
        sets["slots"].append(kept_sets(slots, state))
        nbytes.append([state_of(slots, state, n).untyped_storage().nbytes() for n in state_names])

    got, got_toks, _ = decode_loop(slots, ids, mask, steps, on_slots)
    want, want_toks, _ = decode_loop(ref, ids, mask, steps, lambda i, s: sets["ref"].append(kept_sets(ref, s)))
    assert torch.equal(got_toks, want_toks)
    return got, want, sets, nbytes


def test_h2o_counts_keep_the_reference_sets_over_300_steps(compiled_tiny):
    got, want, sets, nbytes = run_both(compiled_tiny("tiny-llama"), H2O(heavy=3, recent=2), 300,
                                       ("k0", "v0", "key_positions0", "attn_score0"))
    assert sets["slots"] == sets["ref"]
    assert all(len(h) == 5 for step in sets["slots"][1:] for layer in step for row in layer for h in row)  # evicts every step
    assert (got - want).abs().max() <= 1e-4
    assert all(b == nbytes[2] for b in nbytes[2:])  # storage flat once the budget is reached


def test_h2o_fractions_keep_the_reference_sets(compiled_tiny):
    got, want, sets, nbytes = run_both(compiled_tiny("tiny-llama"), H2O(heavy=0.1, recent=0.15), 100)
    assert sets["slots"] == sets["ref"]
    last = sets["slots"][-1][0]
    assert [len(row[0]) for row in last] == [11 + 16, 10 + 16]  # L = 112, 107
    assert (got - want).abs().max() <= 1e-4


def test_streaming_keeps_the_reference_sets_over_200_steps(compiled_tiny):
    got, want, sets, nbytes = run_both(compiled_tiny("tiny-llama"), Streaming(sinks=2, window=5), 200)
    assert sets["slots"] == sets["ref"]
    assert sets["slots"][-1][1][0][0] == [0, 1] + list(range(207, 212))
    assert (got - want).abs().max() <= 1e-4
    assert all(b == nbytes[2] for b in nbytes[2:])


def test_snapkv_decode_appends_in_place(compiled_tiny):
    """SnapKV compresses once; its decode step returns the appended views: the cache buffer never moves."""
    cm = compiled_tiny("tiny-llama")
    ev = CompiledModel(SnapKV(budget=6, window=2).run(cm.step_graph.copy(), PassContext()), backend="torch")
    ids, mask = left_padded_batch(256, LENGTHS, seed=5)
    ptrs = []
    decode_loop(ev, ids, mask, 20, lambda i, s: ptrs.append(state_of(ev, s, "k0").untyped_storage().data_ptr()))
    assert len(set(ptrs[1:])) == 1 and ptrs[0] != ptrs[1]  # one buffer from the first decode step on


@pytest.mark.parametrize("heavy,recent", [((3, 0.0), (2, 0.0)), ((4, 0.0), (0, 0.0)), ((0, 0.0), (3, 0.0)),
                                          ((1, 0.1), (0, 0.2))])
def test_h2o_slots_op_matches_reference_on_random_attention(heavy, recent):
    """Op level, random q/k/v, 120 steps: recent = 0 (the new token may be the victim) and heavy = 0 included."""
    def run(fn):
        sets = []

        def op(q, k, v, q_pos, k_pos, score):
            return fn(q, k, v, q_pos, k_pos, score, 0.35, heavy[0], heavy[1], recent[0], recent[1])

        op_decode_loop(op, [torch.zeros(2, 2, 0)], 120, B=2, on_step=lambda L, kp, ex: sets.append(
            [[sorted(h) for h in row] for row in kept_positions(kp)]))
        return sets

    assert run(h2o_slots) == run(h2o_reference)


def test_streaming_slots_op_matches_reference():
    def run(fn):
        sets = []
        op_decode_loop(lambda q, k, v, qp, kp: fn(k, v, qp, kp, 3, 4), [], 50, B=2,
                       on_step=lambda L, kp, ex: sets.append(kept_positions(kp)))
        return sets

    slots, ref = run(streaming_slots), run(streaming_reference)
    assert [[[sorted(h) for h in row] for row in s] for s in slots] == ref
    assert slots[-1][0][0] != ref[-1][0][0]  # same set, ring order: the slots really moved


def test_rope_cache_index_ranked_is_order_free():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    k_pos = torch.tensor([0, 1, 5, 6, -1, 8, 9, 11, 12]).expand(2, 2, 9).clone()
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    valid = k_pos >= 0
    assert torch.equal(position_rank(k_pos)[valid], cache_index(k_pos)[valid])
    qr, kr = rope_cache_index_ranked(q, k, k_pos, inv, 1.0)
    qw, kw = rope_cache_index_reference(q, k, k_pos, inv, 1.0)
    assert torch.equal(qr, qw) and torch.equal(kr[valid], kw[valid])
    perm = torch.tensor([3, 0, 7, 1, 4, 2, 6, 5, 8])  # slots shuffled, the query's slot stays last
    qp, kp = rope_cache_index_ranked(q, k[:, :, perm], k_pos[:, :, perm], inv, 1.0)
    assert torch.equal(qp, qw) and torch.equal(kp, kr[:, :, perm])


def test_decode_colsum_equals_the_reference():
    q, k, v, q_pos, k_pos = random_step(B=2, H=6, Hk=2, S=12, T=1, seed=3)
    bias = torch.randn(2, 6, 13)
    for kb in (None, bias):
        assert torch.allclose(decode_colsum(q, k, q_pos, k_pos, 0.3, kb), colsum(q, k, q_pos, k_pos, 0.3, kb), atol=1e-6)
