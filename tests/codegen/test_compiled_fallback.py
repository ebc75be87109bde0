"""Eviction ops with no static decode translation on the compiled backend (``codegen/torch/static_fallback.py``):
the generic scored op, Keyformer and Scissorhands run eagerly after the compiled decode graph.

Invariant checked: on a ragged left-padded batch of 2 (prompts 40/31, 45 decode steps), tiny Llama,
``backend="compiled"`` keeps the torch backend's position set per (row, layer, KV head) after every
step, logits within 1e-4, the same greedy tokens (``test_compiled_eviction.check_same_as_torch``), and
``generate`` gives the torch tokens. The decode graph runs eagerly by default (``compiler = lambda gm: gm``);
the Inductor cases compile C++ and are ``slow``. The packed Ada-KV cache stays refused, with the reason.
"""

from __future__ import annotations

import pytest
import torch

from tests.codegen.test_compiled_eviction import LENGTHS, check_same_as_torch, compiled_and_torch, with_recipe
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


@pytest.mark.parametrize("recipe", ["evict(score='knorm', budget=24, rule='adaptive')", "snapkv(budget=24, heads='adaptive')",
                                    "h2o(heavy=16, recent=8, heads='adaptive')"])
def test_packed_adakv_caches_stay_refused_with_the_reason(compiled_tiny, recipe):
    with pytest.raises(ValueError, match=r"backend='compiled' cannot run this recipe: .*packed per-layer cache"):
        with_recipe(compiled_tiny("tiny-llama"), recipe, "compiled")
