"""Runtime: stats are real measurements, sampling is seeded, bad input gets clear errors."""

import pytest
import torch

from graphwright.runtime import positions_from_mask
from tests.conftest import left_padded_batch


def test_positions_from_left_padded_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[-1, -1, 0, 1], [0, 1, 2, 3]]


def test_last_stats_account_for_the_cache(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, [9, 5], seed=4)
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=[])
    s = cm.last_stats
    info = cm.info
    # the cache holds prompt + new tokens except the last (never fed back), padding slots included
    slots = out.shape[1] - 1
    per_token = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 4
    assert s["kv_bytes"] == s["kv_bytes_dense"] == per_token * 2 * slots
    assert s["kv_peak_bytes"] == s["kv_storage_bytes"] >= s["kv_bytes"] and s["kv_fraction"] == 1.0  # dense: the final buffers are the peak
    assert s["kv_index_bytes"] == 8 * 2 * slots
    assert s["new_tokens"] == 7 and s["prompt_tokens"] == 14 and s["batch"] == 2
    assert s["prefill_s"] > 0 and s["decode_s"] > 0 and s["decode_tokens_per_s"] > 0


def test_sampling_is_seeded(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, _ = left_padded_batch(256, [6], seed=5)
    a = cm.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=7, eos_token_id=[])
    b = cm.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=7, eos_token_id=[])
    c = cm.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=8, eos_token_id=[])
    greedy = cm.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(a, b)
    assert not torch.equal(a, c) or not torch.equal(a, greedy)


def test_top_k_one_equals_greedy(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, _ = left_padded_batch(256, [6], seed=6)
    greedy = cm.generate(ids, max_new_tokens=10, eos_token_id=[])
    sampled = cm.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, seed=0, eos_token_id=[])
    assert torch.equal(greedy, sampled)


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.zeros(2, 0, dtype=torch.long), r"seq >= 1"),
    (lambda: torch.full((1, 3), 999), r"token ids must be in \[0, 256\)"),
    (lambda: torch.ones(1, 3), r"integer token ids"),
    (lambda: [1, 2, 3], r"LongTensor"),
])
def test_bad_prompts(compiled_tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        compiled_tiny("tiny-llama").generate(bad(), max_new_tokens=2)


def test_bad_masks_and_args(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids = torch.randint(3, 256, (2, 4))
    with pytest.raises(ValueError, match="left-padded"):
        cm.generate(ids, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one real"):
        cm.generate(ids, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        cm.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        cm.generate(ids, max_new_tokens=2, do_sample=True, temperature=0)
