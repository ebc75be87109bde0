"""Slot decode of evict(score=..., when="decode"), Keyformer and Scissorhands (``codegen/torch/policy_slots.py``).

The same step graph is lowered twice: the torch backend (slots at decode) and the torch backend with
the compacting references (``eviction_helpers.COMPACTING``). Both must keep the same position set per
(row, layer, KV head) after every step of hundreds of decode steps on a left-padded batch of 2, give
logits within 1e-4 and the same greedy tokens; the slot version's buffers stop growing once the budget
is reached and its steps really run on slots (one buffer from the first decode step on, written in place).
"""

from __future__ import annotations

import math

import pytest
import torch

import graphwright.codegen.torch.policy_slots as policy_slots
from graphwright.codegen.torch.policy_slots import keyformer_slots, reference_slot_index, scissorhands_slots, scored_acc_slots, scored_slots
from graphwright.compiled import CompiledModel
from graphwright.ops.policy_keyformer import gumbel_noise, keyformer_reference
from graphwright.ops.policy_scissorhands import ring_bytes, scissorhands_reference
from graphwright.ops.policy_scored import scored_reference
from graphwright.passes.eviction_common import positions_name
from graphwright.verify import run_recipe
from tests.conftest import _compiled, left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, decode_loop, kept_positions, op_decode_loop, state_of

LENGTHS = [14, 9]  # batch 2, row 1 left-padded by 5


def kept_sets(cm, state):
    return [[[sorted(int(p) for p in row if p >= 0) for row in heads] for heads in state_of(cm, state, positions_name(layer))]
            for layer in range(cm.info.num_layers)]


def run_both(recipe, steps, state_names=("k0", "v0", "key_positions0")):
    """Decode ``steps`` with both lowerings -> (logits slots, logits ref, sets per step, storage bytes per step, ordered)."""
    sg, _, _ = run_recipe(_compiled("tiny-llama").step_graph, recipe, verify=False)
    slots, ref = CompiledModel(sg, backend="torch"), CompiledModel(sg, backend=COMPACTING)
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    sets = {"slots": [], "ref": []}
    nbytes, ptrs = [], []

    def on_slots(i, state):
        sets["slots"].append(kept_sets(slots, state))
        nbytes.append([state_of(slots, state, n).untyped_storage().nbytes() for n in state_names])
        ptrs.append(state_of(slots, state, "k0").untyped_storage().data_ptr())

    got, got_toks, _ = decode_loop(slots, ids, mask, steps, on_slots)
    want, want_toks, _ = decode_loop(ref, ids, mask, steps, lambda i, s: sets["ref"].append(kept_sets(ref, s)))
    assert torch.equal(got_toks, want_toks)
    assert len(set(ptrs[1:])) == 1  # the slot version really ran: one buffer, written in place (no compaction)
    return got, want, sets, nbytes


@pytest.mark.parametrize("recipe, kept", [
    ("evict(score='h2o', when='decode', budget=7, window=2)", 7),
    pytest.param("evict(score='knorm', when='decode', budget=7, window=2, sinks=1)", 7, marks=pytest.mark.slow),
    ("evict(score='tova', when='decode', budget=6)", 6),
    pytest.param("evict(score='keydiff', when='decode', budget=6, window=1)", 6, marks=pytest.mark.slow),
])
def test_scored_token_budgets_keep_the_reference_sets_over_200_steps(recipe, kept):
    got, want, sets, nbytes = run_both(recipe, 200)
    assert sets["slots"] == sets["ref"]
    assert all(len(h) == kept for step in sets["slots"][1:] for layer in step for row in layer for h in row)
    assert (got - want).abs().max() <= 1e-4
    assert all(b == nbytes[2] for b in nbytes[2:])  # storage flat once the budget is reached


@pytest.mark.parametrize("recipe", [
    "evict(score='h2o', when='decode', budget=0.3, window=0.1)",
    pytest.param("evict(score='knorm', when='decode', budget=0.4, window=2)", marks=pytest.mark.slow),
    pytest.param("evict(score='tova', when='decode', budget=0.35, sinks=2)", marks=pytest.mark.slow),
    pytest.param("evict(score='keydiff', when='decode', budget=0.3, window=0.05)", marks=pytest.mark.slow),
])
def test_scored_fraction_budgets_keep_the_reference_sets(recipe):
    got, want, sets, _ = run_both(recipe, 120)
    assert sets["slots"] == sets["ref"]
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("recipe", ["keyformer(kv=0.6, recent=0.3)",
                                    pytest.param("keyformer(kv=8, recent=0.25, noise='none')", marks=pytest.mark.slow),
                                    pytest.param("keyformer(kv=0.5, recent=0.0, tau_delta=0.05, seed=3)",
                                                 marks=pytest.mark.slow)])
def test_keyformer_keeps_the_reference_sets_over_200_steps(recipe):
    got, want, sets, nbytes = run_both(recipe, 200, ("k0", "v0", "key_positions0", "keyformer_score0"))
    assert sets["slots"] == sets["ref"]
    assert (got - want).abs().max() <= 1e-4
    assert all(b == nbytes[2] for b in nbytes[2:])


@pytest.mark.parametrize("recipe", ["scissorhands(budget=8, history=12, recent=2, sinks=1)",
                                    pytest.param("scissorhands(budget=6, history=5, recent=0)", marks=pytest.mark.slow)])
def test_scissorhands_keeps_the_reference_sets_over_200_steps(recipe):
    got, want, sets, nbytes = run_both(recipe, 200, ("k0", "v0", "key_positions0", "scissorhands_bits0"))
    assert sets["slots"] == sets["ref"]
    assert (got - want).abs().max() <= 1e-4
    assert all(b == nbytes[2] for b in nbytes[2:])


@pytest.mark.parametrize("recipe, scored", [("evict(score='h2o', when='decode', budget=7, window=2)", 2),
                                            ("evict(score='tova', when='decode', budget=6)", 2),
                                            ("evict(score='knorm', when='decode', budget=7)", 0),
                                            ("scissorhands(budget=16)", 2), ("keyformer(kv=0.5)", 0)])
def test_layers_reading_the_step_probabilities_get_scored_attention(recipe, scored):
    """The attention of a layer whose eviction reads this step's probabilities computes them once (scored_attention.py)."""
    sg, _, _ = run_recipe(_compiled("tiny-llama").step_graph, recipe, verify=False)
    assert CompiledModel(sg, backend="torch").lowered_code().count("attention_sdpa_scored(") == scored


# ----------------------------------------------------------------------------------- op level, random attention
SCALE = 1 / math.sqrt(8)


def _scored_params(scorer, budget_n, budget_f=0.0, sinks=0, window=0, window_f=0.0, when="decode"):
    return (SCALE, scorer, when, 0, 0, budget_n, budget_f, sinks, window, 1, "avg", "mean", 0, "each", 0.0, 0, 2, 512,
            0.0, 1.0, window_f)


def _sets_over(fn, extra, steps, B=2):
    sets = []
    op_decode_loop(fn, extra, steps, B=B, seed=1, on_step=lambda L, kp, ex: sets.append(
        [[sorted(h) for h in row] for row in kept_positions(kp)]))
    return sets


@pytest.mark.parametrize("scorer", ["h2o", "knorm", "keydiff", "tova"])
@pytest.mark.parametrize("budget", [dict(budget_n=6, window=2), dict(budget_n=5, sinks=2), dict(budget_n=4),
                                    dict(budget_n=1, budget_f=0.2, window_f=0.05)])
def test_scored_slots_op_matches_reference_on_random_attention(scorer, budget):
    params = _scored_params(scorer, **budget)
    acc = scorer == "h2o"
    extra = [torch.zeros(2, 2, 0)] if acc else []
    slots = scored_acc_slots if acc else scored_slots

    def run(reference):
        def op(q, k, v, q_pos, k_pos, *state):
            if reference:
                return scored_reference(q, k, v, q_pos, k_pos, *state, *params, acc=acc)
            return slots(q, k, v, q_pos, k_pos, *state, *params)
        return _sets_over(op, extra, 150)

    got, want = run(False), run(True)
    assert got == want
    assert len(got[-1][0][0]) < 150  # it evicted


def test_scored_slots_leave_other_schedules_to_the_reference():
    """when='every:N' drops several tokens at once: the reference runs (its output is compacted, in position order)."""
    params = _scored_params("knorm", 4, when="every")[:3] + (3,) + _scored_params("knorm", 4)[4:]
    seen = []

    def op(q, k, v, q_pos, k_pos):
        out = scored_slots(q, k, v, q_pos, k_pos, *params)
        want = scored_reference(q, k, v, q_pos, k_pos, *params)
        assert torch.equal(out[2], want[2])
        seen.append(out[2].shape[-1])
        return out

    op_decode_loop(op, [], 20, B=2)
    assert min(seen[1:]) == 4 and max(seen) > 5  # grows between the steps that evict


def test_reference_slot_index_is_the_compacted_index():
    k_pos = torch.tensor([[[7, -1, 3, 5, 9], [-1, -1, 4, -1, 9]]])  # slot 4: the new token
    idx, width = reference_slot_index(k_pos)
    assert int(width) == 4  # widest head holds 3 cached tokens, plus the new one
    assert idx[0, 0].tolist()[:4] == [2, 3, 0, 1] and idx[0, 0, 4] == 3
    assert idx[0, 1, 2] == 0 and idx[0, 1, 4] == 3


@pytest.mark.parametrize("kv, recent, noise", [(6, 0.34, "gumbel"), (0.5, 0.0, "gumbel"), (5, 0.5, "none")])
def test_keyformer_slots_op_matches_reference(kv, recent, noise):
    kv_n, kv_f = (kv, 0.0) if isinstance(kv, int) else (0, kv)

    def run(fn):
        def op(q, k, v, q_pos, k_pos, score, meta):
            return fn(q, k, v, q_pos, k_pos, score, meta, SCALE, kv_n, kv_f, recent, 1.0, 0.02, 7, 1, noise)
        return _sets_over(op, [torch.zeros(2, 2, 0), torch.zeros(2, 2, 0, dtype=torch.long)], 200)

    got, want = run(keyformer_slots), run(keyformer_reference)
    assert got == want
    assert len(got[-1][0][0]) < 20


def test_slot_gumbel_is_the_references_draw_per_token():
    """The noise each slot's token gets equals the reference's noise at that token's compacted index."""
    k_pos = torch.tensor([[[7, -1, 3, 5, 9], [-1, -1, 4, -1, 9]], [[2, 6, -1, 1, 10], [6, 0, 2, -1, 10]]])
    z = policy_slots.slot_gumbel(3, 1, 5, k_pos, H=4)  # [B, Hk, g, S+1]
    idx, width = reference_slot_index(k_pos)
    want = gumbel_noise(3, 1)(5, 0, (2, 4, 1, int(width)))[:, :, 0]  # [B, H, W]
    for b in range(2):
        for h in range(4):
            for s in range(5):
                if k_pos[b, h // 2, s] >= 0:
                    assert z[b, h // 2, h % 2, s] == want[b, h, idx[b, h // 2, s]]


@pytest.mark.parametrize("budget, history, recent, sinks", [(6, 9, 2, 1), (5, 16, 0, 0), (4, 3, 3, 1), (3, 8, 4, 0)])
def test_scissorhands_slots_op_matches_reference(budget, history, recent, sinks):
    """Random attention, 200 steps; recent + sinks >= budget included (only protected tokens are kept then)."""
    def run(fn):
        def op(q, k, v, q_pos, k_pos, bits, count, step):
            return fn(q, k, v, q_pos, k_pos, bits, count, step, SCALE, budget, history, recent, sinks)
        extra = [torch.zeros(2, 2, 0, ring_bytes(history), dtype=torch.uint8), torch.zeros(2, 2, 0, dtype=torch.int32),
                 torch.zeros(2, 2, 0, dtype=torch.long)]
        return _sets_over(op, extra, 200)

    got, want = run(scissorhands_slots), run(scissorhands_reference)
    assert got == want
    assert len(got[-1][0][0]) == max(budget - 1, min(recent, 200) + sinks)
