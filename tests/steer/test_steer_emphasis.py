"""Emphasis API: span lists -> per-position weights, batches with left padding, clear errors."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.steer.bias import steer_key_bias
from graphwright.steer.emphasis import emphasis_weights, normalize_emphasis
from tests.conftest import left_padded_batch


@pytest.fixture(scope="module")
def steered():
    m, _ = gw.load_model("tiny-qwen2")
    return gw.compile(m, recipe="steer(alpha=0.01, heads={0: [0, 3], 1: [1]})")


def test_multiple_spans_combine_additively():
    # exclude: each span adds log(alpha) outside itself; include: +1 inside each span, -1 everywhere
    rows = [[(0, 2), (1, 3)], [], [(4, 5)]]
    w = emphasis_weights(rows, [4, 3, 5], "exclude")
    assert w.tolist() == [[1, 0, 1, 2, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    w = emphasis_weights(rows, [4, 3, 5], "include")
    assert w.tolist() == [[0, 1, 0, -1, 0], [0, 0, 0, 0, 0], [-1, -1, -1, -1, 0]]


def test_key_bias_follows_positions_not_columns():
    w = torch.tensor([[1.0, 0.0, 2.0]])
    coef = torch.tensor([-2.0, 0.0])
    k_pos = torch.tensor([[-1, 0, 1, 2, 3, 4]])  # a padding slot, the prompt, two generated tokens
    kb = steer_key_bias(w, k_pos, coef)
    assert kb.tolist() == [[[0, -2, 0, -4, 0, 0], [0, 0, 0, 0, 0, 0]]]
    # per-head caches (evicting passes): k_pos [B, H_kv, S], bias expanded to the query heads of each group
    k_pos3 = torch.tensor([[[2, 0, -1], [1, 3, 0]]])
    kb3 = steer_key_bias(w, k_pos3, torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    expect = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]).repeat_interleave(2, dim=1) * torch.tensor([-1.0, -2, -3, -4])[None, :, None]
    assert torch.equal(kb3, expect)
    assert steer_key_bias(None, k_pos, coef) is None


def test_left_padded_batch_matches_rows_alone(steered):
    ids, mask = left_padded_batch(256, [7, 11, 9], seed=3)
    spans = [[(1, 3)], [(2, 5), (7, 10)], []]
    batch_logits = steered.logits(ids, attention_mask=mask, emphasis=spans)
    batch_out = steered.generate(ids, max_new_tokens=5, attention_mask=mask, emphasis=spans)
    for b, n in enumerate([7, 11, 9]):
        row = ids[b:b + 1, -n:]
        alone = steered.logits(row, emphasis=spans[b])
        torch.testing.assert_close(batch_logits[b, -n:], alone[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(batch_out[b, ids.shape[1]:], steered.generate(row, max_new_tokens=5, emphasis=spans[b])[0, n:])
    # the rows really are steered differently: row 2 (no spans) is the base model
    base = steered.logits(ids[2:3, -9:])
    torch.testing.assert_close(batch_logits[2, -9:], base[0], atol=1e-4, rtol=1e-4)
    assert (batch_logits[1, -11:] - steered.logits(ids[1:2, -11:])[0]).abs().max() > 1e-3


@pytest.mark.parametrize("emphasis, needle", [
    ([(3, 20)], "emphasis span (3, 20) is empty or outside the prompt, which has 8 tokens"),
    ([(5, 5)], "is empty or outside the prompt"),
    ([(-1, 2)], "0 <= start < end <= 8"),
    ("hello", "must be a list of (start, end) token spans"),
    ([(1, 2.5)], "must be a list of (start, end) int spans"),
])
def test_bad_spans_are_clear_errors(steered, emphasis, needle):
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as err:
        steered.generate(ids, max_new_tokens=2, emphasis=emphasis)
    assert needle in str(err.value)


def test_batch_span_errors_name_the_row(steered):
    ids, mask = left_padded_batch(256, [4, 8], seed=1)
    with pytest.raises(ValueError, match=r"span \(2, 6\) is empty or outside the prompt of row 0, which has 4 tokens"):
        steered.logits(ids, attention_mask=mask, emphasis=[[(2, 6)], [(2, 6)]])
    with pytest.raises(ValueError, match="the batch has 2 rows: give emphasis as one list"):
        steered.logits(ids, attention_mask=mask, emphasis=[(0, 1)])
    with pytest.raises(ValueError, match="emphasis has 3 span lists but the batch has 2 rows"):
        steered.logits(ids, attention_mask=mask, emphasis=[[], [], []])


def test_emphasis_on_unsteered_model_is_an_error(compiled_tiny):
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="emphasis needs a steered model: compile with a steer pass"):
        compiled_tiny("tiny-llama").generate(ids, max_new_tokens=2, emphasis=[(0, 3)])


def test_normalize_accepts_one_row_or_rows():
    assert normalize_emphasis([(0, 2), [3, 4]], 1) == [[(0, 2), (3, 4)]]
    assert normalize_emphasis([[(0, 2)], []], 2) == [[(0, 2)], []]
    assert normalize_emphasis([], 1) == [[]]
