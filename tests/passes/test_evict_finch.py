"""evict(score='finch', window=<question length>): exact setting, kept sets, compositions, refusals, contexts."""

from __future__ import annotations

import pytest
import torch

from graphwright import RecipeError
from graphwright.passes.evict import Evict
from tests.conftest import _compiled, left_padded_batch
from tests.passes.eviction_helpers import decode_loop, run_pass
from tests.passes.test_evict_scorers import LENGTHS, dense, kept_every_step


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_budget_one_is_the_identity(name, chunk):
    ids, mask, (want_logits, want) = dense(name)
    ev = run_pass(_compiled(name), Evict(score="finch", budget=1.0, window=3, chunk=chunk))
    assert Evict(score="finch", budget=1.0, window=3).is_identity()
    logits, toks, _ = decode_loop(ev, ids, mask, 32)
    assert torch.equal(toks, want)
    assert (logits - want_logits).abs().max() <= 1e-4


def test_prefill_keeps_the_budget_with_the_question_then_appends():
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=12)
    seen, _, _ = kept_every_step(run_pass(cm, Evict(score="finch", budget=7, window=3)), ids, mask, 3)
    for step, extra in zip(seen, range(4)):
        for layer in step:
            for row, L in zip(layer, LENGTHS):
                for h in row:
                    assert len(h) == 7 + extra  # evicted once after prefill, decode appends
                    assert set(range(L - 3, L)) <= set(h)  # the question window is kept
    assert seen[0][0][0][0] != seen[0][1][0][0] or seen[0][0][0][0] != seen[0][0][0][1]  # sets are per layer / head


@pytest.mark.parametrize("args,msg", [
    (dict(score="finch", budget=6), "needs window=<the question's length in tokens>"),
    (dict(score="finch", budget=0.5, window=0.1), "takes window as an int >= 1"),
    (dict(score="finch", budget=6, window=0), "takes window as an int >= 1"),
    (dict(score="finch", budget=6, window=3, when="decode"), "runs only when='prefill'"),
    (dict(score="finch", budget=6, window=3, kernel=3), "kernel= is not read"),
    (dict(score="finch", budget=6, window=3, chunk=4, chunk_heads="each"), "not ChunkKV"),
    (dict(score="finch", budget=6, window=3, chunk=4, rule="pyramid"), "takes rule='fixed'"),
    (dict(score="finch", budget=6, window=3, chunk_reuse=2), "does not take chunk_heads= / chunk_reuse="),
    (dict(score="finch", budget=4, window=5), "exceed budget=4"),
])
def test_bad_arguments_are_refused(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)


def test_a_reusable_context_is_refused_with_the_reason():
    cm = run_pass(_compiled("tiny-llama"), Evict(score="finch", budget=6, window=3))
    ids, _ = left_padded_batch(256, [10], seed=9)
    with pytest.raises(ValueError, match="which a reusable context does not hold"):
        cm.prefill(ids)


def test_adaptive_floor_one_keeps_the_fixed_sets_and_pyramid_decreases():
    """Finch under the generic budget rules: Ada-KV with floor=1 is the uniform split (the fixed rule's tokens);
    PyramidKV gives earlier layers more."""
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=13)
    la, ta, _ = decode_loop(run_pass(cm, Evict(score="finch", budget=8, window=3, rule="adaptive", floor=1.0)), ids, mask, 4)
    lf, tf, _ = decode_loop(run_pass(cm, Evict(score="finch", budget=8, window=3)), ids, mask, 4)
    assert torch.equal(ta, tf) and (la - lf).abs().max() <= 1e-5
    ids, mask = left_padded_batch(256, [40, 30], seed=5)
    seen, _, _ = kept_every_step(run_pass(cm, Evict(score="finch", budget=12, window=3, rule="pyramid", beta=4.0)), ids, mask, 0)
    sizes = [len(seen[0][layer][0][0]) for layer in range(cm.info.num_layers)]
    assert sizes[0] > sizes[-1] and abs(sum(sizes) - 12 * len(sizes)) <= len(sizes)
