"""Eviction ops with no static decode translation on the compiled backend (``codegen/torch/static_fallback.py``):
the generic scored op, Keyformer and Scissorhands run eagerly after the compiled decode graph.

Invariant checked: on a ragged left-padded batch of 2 (prompts 40/31, 45 decode steps), tiny Llama,
``backend="compiled"`` keeps the torch backend's position set per (row, layer, KV head) after every
step, logits within 1e-4, the same greedy tokens (``test_compiled_eviction.check_same_as_torch``), and
``generate`` gives the torch tokens; FastGen and fraction H2O (no fixed capacity) too; ``evict(block=N)``'s
block-wise prefill keeps the torch sets after every block. The decode graph runs eagerly by default
(``compiler = lambda gm: gm``); the Inductor cases compile C++ and are ``slow``. The packed Ada-KV cache
stays refused, with the reason.
"""

from __future__ import annotations

import pytest
import torch

from graphwright.capture.step_graph import prompt_blocks
from graphwright.ops.eviction import EVICT_FASTGEN, EVICT_H2O
from graphwright.runtime import positions_from_mask
from tests.codegen.test_compiled_eviction import LENGTHS, check_same_as_torch, compiled_and_torch, kept_sets, with_recipe
from tests.conftest import left_padded_batch

CASES = [
    "evict(score='tova', when='decode', budget=24, window=4)",  # one score per layer, every step
    # keydiff, not knorm: RoPE keeps a key's norm, so a repeated token ties exactly in knorm and the compiled
    # backend's decode linears (not the torch backend's GEMV copies) round such ties either way
    "evict(score='keydiff', when='every:4', budget=24, sinks=2)",  # every 4th step
    "evict(score='h2o', when='decode', budget=24, window=4)",  # running per-slot score (evict_scored_acc)
    "evict(score='expected_attention', budget=24)",  # reads the rotary table (evict_scored_rope); decode appends
    "evict(score='chunkkv', budget=24, chunk=2, window=1, chunk_reuse=2)",  # layer 1 reads layer 0's kept positions
    "keyformer(kv=24, recent=0.25)",  # per-slot score and per-head frozen budgets (meta)
    "scissorhands(budget=24, recent=4, sinks=2)",  # per-slot bits [B, Hk, S, W] and counts, per-head step
]


@pytest.mark.parametrize("inductor", [pytest.param(True, marks=pytest.mark.slow), False], ids=["inductor", "eager"])
@pytest.mark.parametrize("recipe", CASES)
def test_eager_fallback_keeps_the_torch_backends_sets_logits_and_tokens(compiled_tiny, recipe, inductor):
    cm, ref = compiled_and_torch(compiled_tiny("tiny-llama"), recipe, inductor)
    assert cm._backend_step.fallback["records"]  # the op runs after the compiled graph, not refused
    logits, toks, sets, shapes, frames = check_same_as_torch(cm, ref)
    assert max(len(h) for h in sets[0][0]) <= 24 < LENGTHS[0]  # it evicted at prefill
    if "when='decode'" in recipe or recipe.startswith(("keyformer", "scissorhands")):
        assert max(len(h) for step in sets[1:] for layer in step for h in layer) <= 24  # and at every decode step
    assert len({c["capacity"] for c in cm._backend_step.compiles}) == 1  # the static buffers never grew past a bucket
    ids, mask = left_padded_batch(cm.info.vocab_size, LENGTHS, seed=1)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=8), ref.generate(ids, attention_mask=mask, max_new_tokens=8))
    assert cm.last_stats["kept_tokens_per_head"] == ref.last_stats["kept_tokens_per_head"]


@pytest.mark.parametrize("inductor", [pytest.param(True, marks=pytest.mark.slow), False], ids=["inductor", "eager"])
@pytest.mark.parametrize("recipe, cut", [("fastgen(recovery=0.9)", EVICT_FASTGEN), ("h2o(heavy=0.25, recent=0.25)", EVICT_H2O)])
def test_no_fixed_capacity_runs_in_the_eager_fallback_with_the_torch_backends_sets(compiled_tiny, recipe, cut, inductor):
    """FastGen and fraction H2O (no fixed decode capacity): the compacting references after the compiled graph keep
    the sets of the torch backend's slot versions (``eviction_slots.py``) after every step; same logits and tokens."""
    cm, ref = compiled_and_torch(compiled_tiny("tiny-llama"), recipe, inductor)
    assert [r["op"] for r in cm._backend_step.fallback["records"]] == [cut, cut]  # both layers, not refused
    logits, toks, sets, shapes, frames = check_same_as_torch(cm, ref)
    assert min(sum(len(h) for h in layer) for step in sets[1:] for layer in step) < 2 * sum(LENGTHS)  # it evicted
    assert len({c["capacity"] for c in cm._backend_step.compiles}) == 1
    ids, mask = left_padded_batch(cm.info.vocab_size, LENGTHS, seed=1)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=8), ref.generate(ids, attention_mask=mask, max_new_tokens=8))


@pytest.mark.parametrize("lengths", [[20, 13], [21, 12]], ids=["blocks-of-4", "first-block-1-token"])
def test_block_prefill_keeps_the_torch_backends_sets(compiled_tiny, lengths):
    """``evict(block=N)``: the runtime runs the prompt as blocks of N through the step (``prompt_blocks``); on the
    compiled backend every block is an eager step (a 1-token first block is a compiled decode step on the empty
    state), decode appends. Same kept sets after every block and decode step, same logits and tokens as torch."""
    recipe = "evict(score='keydiff', block=4, budget=6, window=1)"
    cm, ref = compiled_and_torch(compiled_tiny("tiny-llama"), recipe, inductor=False)
    assert cm._runtime.prefill_chunk == ref._runtime.prefill_chunk == 4
    ids, mask = left_padded_batch(cm.info.vocab_size, lengths, seed=8)
    assert prompt_blocks(ids.shape[1], 4)[0][1] == (4 if lengths[0] == 20 else 1)

    def blocks(m):
        state, pos, sets = m.runtime_graph.init_state(2), positions_from_mask(mask), []
        for a, b in prompt_blocks(ids.shape[1], 4):
            logits, state = m._step(ids[:, a:b], pos[:, a:b], torch.tensor([b - a - 1]), state)
            sets.append(kept_sets(m, state))
        out, nxt_pos = [logits[:, -1]], pos[:, -1:] + 1
        for _ in range(12):
            logits, state = m._step(out[-1].argmax(-1)[:, None], nxt_pos, torch.zeros(1, dtype=torch.long), state)
            nxt_pos = nxt_pos + 1
            out.append(logits[:, -1])
            sets.append(kept_sets(m, state))
        return torch.stack(out), sets

    (got, got_sets), (want, want_sets) = blocks(cm), blocks(ref)
    assert got_sets == want_sets and (got - want).abs().max() <= 1e-4
    assert all(len(h) <= 6 for layer in got_sets[len(prompt_blocks(ids.shape[1], 4)) - 1] for h in layer)  # evicted by block
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=10), ref.generate(ids, attention_mask=mask, max_new_tokens=10))
    assert cm.last_stats["kept_tokens_per_head"] == ref.last_stats["kept_tokens_per_head"]


@pytest.mark.parametrize("recipe", ["evict(score='knorm', budget=24, rule='adaptive')", "h2o(heavy=16, recent=8, heads='adaptive')"])
def test_packed_adakv_caches_other_than_snapkvs_stay_refused_with_the_reason(compiled_tiny, recipe):
    """(snapkv's packed forms compile: ``test_compiled_eviction.py``.)"""
    with pytest.raises(ValueError, match=r"backend='compiled' cannot run this recipe: .*packed per-layer cache"):
        with_recipe(compiled_tiny("tiny-llama"), recipe, "compiled")
