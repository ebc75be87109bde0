"""snapkv: exact when the prompt fits, dense prefill, prompt compressed once then append-only."""

from __future__ import annotations

import pytest
import torch

from graphwright import RecipeError
from graphwright.ops.eviction_ref import snapkv_reference
from graphwright.passes.snapkv import SnapKV
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import assert_exact_setting, decode_loop, op_decode_loop, run_pass, state_of

LENGTHS = [12, 7]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_budget_at_least_length_is_identity(compiled_tiny, name):
    cm = compiled_tiny(name)
    assert_exact_setting(cm, SnapKV(budget=12, window=4), 32, LENGTHS)


def test_first_token_equals_dense_and_budget_after_prefill(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, [20, 9], seed=2)
    dense, _, _ = decode_loop(cm, ids, mask, 0)
    ev = run_pass(cm, SnapKV(budget=8, window=3, kernel=3, pool="max"))
    counts = []
    logits, _, _ = decode_loop(ev, ids, mask, 5, on_step=lambda i, st: counts.append((state_of(ev, st, "key_positions1") >= 0).sum(-1)))
    assert torch.equal(logits[0], dense[0])
    # min(length, budget) per head after prefill, then one more token per step and no eviction
    for i, c in enumerate(counts):
        assert c.tolist() == [[8 + i] * 2, [8 + i] * 2]


def test_no_eviction_during_500_decode_steps():
    def op(q, k, v, q_pos, k_pos):
        return snapkv_reference(q, k, v, q_pos, k_pos, 0.35, 6, 2, 5, "avg")

    seen = []
    op_decode_loop(op, [], 500, prompt=10, on_step=lambda L, kp, ex: seen.append(int((kp >= 0).sum(-1).min())))
    assert seen == [6 + i for i in range(501)]


def test_bad_arguments_and_default_window():
    with pytest.raises(RecipeError, match=r"window=8 must not exceed budget=4; pass window <= 4"):
        SnapKV(budget=4, window=8)
    # the window defaults to min(32, budget // 2), so a small budget alone is a valid recipe
    assert [SnapKV(budget=b).window for b in (16, 2048, 1)] == [8, 32, 1]
    with pytest.raises(RecipeError, match="odd"):
        SnapKV(kernel=4)
