"""Torch-backend slot eviction (``codegen/torch/eviction_slots.py``) against the compacting references.

The same step graph is lowered twice: the torch backend (slots at decode) and the torch backend
with the eviction references put back (compaction at every step). Both must keep the same set of
positions per (row, KV head) after every step, give logits within 1e-4 (softmax sums in another
order), and the slot version's buffers must stop growing once the budget is reached.
"""

from __future__ import annotations

import pytest
import torch

from graphwright.codegen.torch.eviction_slots import decode_colsum, fastgen_slots, h2o_slots, position_rank, rope_cache_index_ranked, streaming_slots
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction_ref import PUNCT, SPECIAL, colsum, h2o_reference, streaming_reference
from graphwright.ops.fastgen_ref import fastgen_reference
from graphwright.ops.rope_index_ref import cache_index, rope_cache_index_reference
from graphwright.passes.base import PassContext
from graphwright.passes.fastgen import FastGen
from graphwright.passes.h2o import H2O
from graphwright.passes.snapkv import SnapKV
from graphwright.passes.streaming import Streaming
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, decode_loop, kept_positions, kept_sets, op_decode_loop, random_step, state_of

LENGTHS = [12, 7]  # batch 2, row 1 left-padded by 5


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


@pytest.mark.parametrize("p, scored, shifted", [(H2O(heavy=3, recent=2), 2, 0), (Streaming(sinks=2, window=5), 0, 2),
                                                (SnapKV(budget=6, window=2), 0, 0)])
def test_only_running_score_layers_compute_explicit_probabilities(compiled_tiny, p, scored, shifted):
    """codegen/torch/scored_attention.py: H2O layers call attention_sdpa_scored (the probabilities feed the
    score); SnapKV layers keep SDPA, StreamingLLM layers attend through streaming_shift.streaming_attention
    (SDPA until a token leaves; their kept sets and logits are checked above)."""
    sg = p.run(compiled_tiny("tiny-llama").step_graph.copy(), PassContext())
    code = CompiledModel(sg, backend="torch").lowered_code()
    assert code.count("attention_sdpa_scored(") == scored
    assert code.count("streaming_attention(") == shifted
    assert code.count("attention_sdpa(") == 2 - scored - shifted


def test_h2o_token_counts_tell_the_attention_their_capacity(compiled_tiny):
    """scored_attention passes full_at = heavy + recent to an H2O layer with token counts (its full steps build
    no mask: test_attention_decode), nothing with fractions (no fixed capacity)."""
    base = compiled_tiny("tiny-llama").step_graph
    code = CompiledModel(H2O(heavy=3, recent=2).run(base.copy(), PassContext()), backend="torch").lowered_code()
    assert code.count("full_at = 5") == 2
    code = CompiledModel(H2O(heavy=0.1, recent=0.15).run(base.copy(), PassContext()), backend="torch").lowered_code()
    assert "full_at" not in code and code.count("attention_sdpa_scored(") == 2


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
    for scaling in (1.0, 0.7):  # cos/sin from the rope table (scaling folded in): equal up to rounding
        qr, kr = rope_cache_index_ranked(q, k, k_pos, inv, scaling)
        qw, kw = rope_cache_index_reference(q, k, k_pos, inv, scaling)
        assert torch.allclose(qr, qw, atol=1e-6) and torch.allclose(kr[valid], kw[valid], atol=1e-6)
    qr, kr = rope_cache_index_ranked(q, k, k_pos, inv, 1.0)
    perm = torch.tensor([3, 0, 7, 1, 4, 2, 6, 5, 8])  # slots shuffled, the query's slot stays last
    qp, kp = rope_cache_index_ranked(q, k[:, :, perm], k_pos[:, :, perm], inv, 1.0)
    assert torch.equal(qp, qr) and torch.equal(kp, kr[:, :, perm])


def test_decode_colsum_equals_the_reference():
    q, k, v, q_pos, k_pos = random_step(B=2, H=6, Hk=2, S=12, T=1, seed=3)
    bias = torch.randn(2, 6, 13)
    for kb in (None, bias):
        assert torch.allclose(decode_colsum(q, k, q_pos, k_pos, 0.3, kb), colsum(q, k, q_pos, k_pos, 0.3, kb), atol=1e-6)


# ----------------------------------------------------------------------------------- FastGen
def class_table(vocab: int) -> torch.Tensor:
    """A token-class table without a tokenizer: every 7th id special, every 4th other one punctuation."""
    i = torch.arange(vocab)
    return torch.where(i % 7 == 0, SPECIAL, torch.where(i % 4 == 0, PUNCT, 0)).to(torch.int8)


def test_fastgen_keeps_the_reference_sets_over_200_steps(compiled_tiny):
    """Profiled heads (tiny Llama, batch 2 left-padded, counts local=3 frequent=4): layer 0 at recovery 0.5
    picks special/punct/frequent heads, layer 1 at 0.95 full/local/frequent ones; same sets after every step,
    same logits, and no more slots than the largest kept set so far (the reference compacts to the current one)."""
    cm = compiled_tiny("tiny-llama")
    sg = FastGen(recovery=0.5, local=3, frequent=4, layers=[0]).run(cm.step_graph.copy(), PassContext())
    sg = FastGen(recovery=0.95, local=3, frequent=4, layers=[1]).run(sg, PassContext())
    sg.gm.fastgen_token_class.copy_(class_table(sg.gm.fastgen_token_class.shape[0]))
    slots, ref = CompiledModel(sg, backend="torch"), CompiledModel(sg, backend=COMPACTING)
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    sets = {"slots": [], "ref": []}
    widths = []

    def on_slots(i, state):
        sets["slots"].append(kept_sets(slots, state))
        widths.append([state_of(slots, state, f"key_positions{layer}").shape[2] for layer in range(2)])

    got, got_toks, state = decode_loop(slots, ids, mask, 200, on_slots)
    want, want_toks, _ = decode_loop(ref, ids, mask, 200, lambda i, s: sets["ref"].append(kept_sets(ref, s)))
    policies = [state_of(slots, state, f"fastgen_policy{layer}")[..., 0].tolist() for layer in range(2)]
    assert policies == [[[0, 0], [1, 2]], [[4, 3], [2, 2]]]  # [layer][row][KV head]: every ladder policy
    assert torch.equal(got_toks, want_toks)
    assert sets["slots"] == sets["ref"]
    assert (got - want).abs().max() <= 1e-4
    most = widths[0]
    for step, width in zip(sets["slots"][1:], widths[1:]):  # slots never shrink: the largest kept set so far
        most = [max(m, *(len(h) for row in layer for h in row)) for m, layer in zip(most, step)]
        assert width == most
    last = [[len(h) for h in row] for row in sets["slots"][-1][1]]
    assert last[0][0] == 212 and last[1][1] < 100, last  # layer 1: the full head keeps all 212, a frequent one (207) evicts


POLICIES = torch.tensor([[0, 1, 2], [3, 4, 2]])  # [B, Hk]: every ladder policy on some head


def fastgen_op_run(fn, steps, policies, classes, frequent=(4, 0.0), local=(3, 0.0), seed=0):
    """Drive ``fn`` (slots or reference) like the runtime: prefill keeps everything ("full"), then each head
    follows ``policies``.

    ``classes(i, T)`` -> [B, T] int8 classes of step i's tokens. Returns the kept sets per step and the
    storage bytes of k per step.
    """
    B, Hk = policies.shape
    sets, nbytes, step = [], [], [0]

    def op(q, k, v, q_pos, k_pos, score, cls, pol):
        new = classes(step[0], q.shape[2])
        prefill = pol.shape[-1] == 0
        out = fn(q, k, v, q_pos, k_pos, score, cls, new, pol, 0.35, 0.9, local[0], local[1], frequent[0], frequent[1],
                 "mass", "full" if prefill else "")
        nbytes.append(out[0].untyped_storage().nbytes())
        step[0] += 1
        return (*out[:5], policies[..., None].clone() if prefill else out[5])

    empty = [torch.zeros(B, Hk, 0), torch.zeros(B, Hk, 0, dtype=torch.int8), torch.zeros(B, Hk, 0, dtype=torch.long)]
    op_decode_loop(op, empty, steps, B=B, H=2 * Hk, Hk=Hk, prompt=12, seed=seed,
                   on_step=lambda L, kp, ex: sets.append([[sorted(h) for h in row] for row in kept_positions(kp)]))
    return sets, nbytes


def test_fastgen_slots_op_every_policy_matches_reference():
    """Op level, random q/k/v, 40 steps, one head per ladder policy (B = 2, Hk = 3), random classes every step;
    fraction budgets and zero budgets (the model test has counts)."""
    def classes(i, T):
        return torch.randint(0, 3, (2, T), generator=torch.Generator().manual_seed(100 + i)).to(torch.int8)

    for frequent, local in (((1, 0.1), (0, 0.2)), ((0, 0.0), (0, 0.0))):
        slots, _ = fastgen_op_run(fastgen_slots, 40, POLICIES, classes, frequent, local)
        ref, _ = fastgen_op_run(fastgen_reference, 40, POLICIES, classes, frequent, local)
        assert slots == ref
        assert slots[-1][1][1] == list(range(52))  # the full head keeps everything
        assert len(slots[-1][0][0]) < 30  # of 52, the special head drops the others (a third of the tokens are special)


def test_fastgen_slots_storage_stops_growing_at_the_budget():
    """Specials and punctuation only in the prompt, no full head: every set is bounded, so k's buffer stops growing."""
    def classes(i, T):
        return (torch.arange(T) % 3).to(torch.int8).expand(2, T) if i == 0 else torch.zeros(2, T, dtype=torch.int8)

    pols = torch.tensor([[0, 1, 2], [3, 3, 2]])
    slots, nbytes = fastgen_op_run(fastgen_slots, 60, pols, classes)
    ref, _ = fastgen_op_run(fastgen_reference, 60, pols, classes)
    assert slots == ref
    assert [len(h) for h in slots[-1][0]][:2] == [4, 8]  # the prompt's 4 special, 4 punctuation tokens
    assert all(len(h) <= 8 + 4 + 3 for row in slots[-1] for h in row)  # special|punct + frequent + local
    assert all(b == nbytes[5] for b in nbytes[5:])
