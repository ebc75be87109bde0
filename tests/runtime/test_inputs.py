"""Careless input to ``generate``/``logits``: masks that are not 0/1 and lengths past ``max_positions`` are refused.

Invariants: a mask holding anything but 0 and 1 (0.5, 2, -1, NaN), of the wrong shape or dtype, or not
a tensor, is a ``ValueError`` naming ``attention_mask`` before any step runs; bool, integer and float
0/1 masks give the same tokens as the long mask. Prompt + ``max_new_tokens`` past the model's
``max_positions`` is a ``ValueError`` with the numbers (tiny Llama: RoPE, ``allow_long=True`` runs it
with a warning; tiny GPT-2: a learned position table, refused even then, and exactly at the limit it
generates instead of failing inside the embedding). ``streaming`` on every layer lifts the limit.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import graphwright as gw
from graphwright.runtime.inputs import check_length, position_limit
from tests.conftest import left_padded_batch

BAD_MASKS = {
    "half": (torch.full((2, 8), 0.5), r"attention_mask must hold only 0 \(padding\) and 1 \(real token\); got value\(s\) 0.5"),
    "twos": (torch.full((2, 8), 2), r"got value\(s\) 2 \(dtype int64\)"),
    "negative": (-torch.ones(2, 8), r"got value\(s\) -1 \(dtype float32\)"),
    "nan": (torch.full((2, 8), float("nan")), r"got value\(s\) nan"),
    "shape": (torch.ones(2, 7, dtype=torch.long), r"attention_mask shape \[2, 7\] != input_ids shape \[2, 8\]"),
    "dtype": (torch.ones(2, 8, dtype=torch.complex64), r"attention_mask must have a bool, integer or float dtype; got torch.complex64"),
    "list": ([[1] * 8] * 2, r"attention_mask must be a torch tensor of 0s and 1s shaped like input_ids; got list"),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_bad_attention_mask_is_a_value_error(case, compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    mask, message = BAD_MASKS[case]
    with pytest.raises(ValueError, match=message):
        cm.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        cm.logits(ids, attention_mask=mask)


def test_bool_int_and_float_masks_give_the_same_tokens(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(cm.info.vocab_size, [8, 5])
    ref = cm.generate(ids, attention_mask=mask, max_new_tokens=4)
    for m in (mask.bool(), mask.int(), mask.float(), mask.to(torch.uint8)):
        assert torch.equal(cm.generate(ids, attention_mask=m, max_new_tokens=4), ref)


def test_mask_is_checked_before_emphasis_spans_read_it():
    cm = gw.compile(gw.load_model("tiny-llama")[0], recipe="steer(heads={0: [0, 1]}, alpha=0.01)", verify=False)
    ids = torch.randint(3, 200, (1, 8))
    with pytest.raises(ValueError, match=r"got value\(s\) 0.5"):
        cm.generate(ids, attention_mask=torch.full((1, 8), 0.5), emphasis=[(0, 2)], max_new_tokens=2)


def test_llama_past_max_positions_is_refused_unless_allow_long(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    assert cm.info.max_positions == 1024
    long = torch.randint(3, 200, (1, 1020), generator=torch.Generator().manual_seed(1))
    msg = (r"prompt \(1020 tokens, longest row\) \+ max_new_tokens \(10\) = 1030 positions exceeds the model's "
           r"max_positions 1024 \(LlamaForCausalLM\); shorten the prompt or lower max_new_tokens, or pass allow_long=True")
    with pytest.raises(ValueError, match=msg):
        cm.generate(long, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"prompt \(1030 tokens"):
        cm.logits(torch.randint(3, 200, (1, 1030)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = cm.generate(long[:, :1018], max_new_tokens=10, allow_long=True)
    assert out.shape == (1, 1028) and any("allow_long=True" in str(w.message) for w in seen)
    assert cm.generate(long[:, :1014], max_new_tokens=10).shape == (1, 1024)  # exactly at the limit: no error


def test_padding_does_not_count_toward_the_limit(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(cm.info.vocab_size, [1020, 1014])
    with pytest.raises(ValueError, match=r"prompt \(1020 tokens, longest row\)"):
        cm.generate(ids, attention_mask=mask, max_new_tokens=10)


def test_gpt2_learned_positions_refuse_even_with_allow_long(compiled_tiny):
    cm = compiled_tiny("tiny-gpt2")
    long = torch.randint(3, 200, (1, 1020), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"1030 positions exceeds the model's max_positions 1024 \(GPT2LMHeadModel\); "
                                         r"its learned position table has 1024 rows"):
        cm.generate(long, max_new_tokens=10, allow_long=True)
    assert cm.generate(long[:, :1014], max_new_tokens=10).shape == (1, 1024)  # the last position, 1023, runs


def test_position_limit_follows_the_recipe(compiled_tiny):
    info = compiled_tiny("tiny-llama").info
    assert position_limit(info, None) == 1024
    assert position_limit(info, [{"pass": "h2o", "heavy": 0.1, "recent": 0.1}]) == 1024
    assert position_limit(info, [{"pass": "streaming", "layers": [0], "sinks": 4, "window": 8}]) == 1024
    assert position_limit(info, [{"pass": "streaming", "sinks": 4, "window": 8}]) is None
    cm = gw.compile(gw.load_model("tiny-llama")[0], recipe="streaming(sinks=2, window=6)", verify=False)
    assert cm._runtime.max_positions is None
    check_length(info, 5000, 10, None)  # no limit: nothing raised
    with pytest.raises(ValueError, match="allow_long must be True or False"):
        check_length(info, 10, 10, 1024, allow_long="yes")

