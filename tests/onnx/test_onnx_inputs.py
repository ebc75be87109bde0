"""The ONNX Runtime model refuses a mask that is not 0/1 and a length past ``max_positions``, as the torch runtime does."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw


def test_onnx_model_checks_mask_and_length(onnx_artifact):
    _, folder = onnx_artifact("tiny-gpt2", "noop")
    model = gw.load(folder)
    ids = torch.randint(3, 200, (1, 8))
    with pytest.raises(ValueError, match=r"got value\(s\) 2"):
        model.generate(ids, attention_mask=torch.full((1, 8), 2), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"1030 positions exceeds the model's max_positions 1024 \(GPT2LMHeadModel\)"):
        model.generate(torch.randint(3, 200, (1, 1020)), max_new_tokens=10)
