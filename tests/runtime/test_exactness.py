"""Identity compile reproduces Hugging Face: logits within 1e-4 (fp32) and greedy tokens exactly."""

import pytest
import torch

from graphwright.models import TINY_MODELS
from tests.conftest import hf_positions, left_padded_batch


@pytest.mark.parametrize("name", TINY_MODELS)
def test_logits_match_hf(name, tiny, compiled_tiny):
    m, cm = tiny(name), compiled_tiny(name)
    ids, mask = left_padded_batch(256, [12, 8, 5], seed=1)
    want = m(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = cm.logits(ids, mask)
    real = mask.bool()
    assert got.shape == want.shape
    assert (got[real] - want[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("lengths", [[10], [14, 9, 3]], ids=["batch1", "batch3-ragged"])
def test_greedy_tokens_match_hf(name, lengths, tiny, compiled_tiny):
    m, cm = tiny(name), compiled_tiny(name)
    ids, mask = left_padded_batch(256, lengths, seed=2)
    want = m.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = cm.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=[], pad_token_id=0)
    assert got.shape == want.shape == (len(lengths), max(lengths) + 64)
    assert torch.equal(got, want)


def test_eos_stops_rows_like_hf(tiny, compiled_tiny):
    """With an EOS that some rows hit, finished rows are padded and generation stops when all finish."""
    m, cm = tiny("tiny-llama"), compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, [6, 4], seed=3)
    free = cm.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    eos = int(free[0, 6 + 3])  # the 4th token row 0 generates: it becomes "EOS"
    want = m.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=eos)
    got = cm.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[0, 6 + 4:] == 0).all()
