"""evict(score=...) exports to ONNX: the generic scored op stays on the runtime side of the split
(``codegen/onnx/split.py`` keeps every registered eviction op), including the variant that reads the
layer's rotary table (Expected Attention) and the one with running state (cumulative attention).
ONNX Runtime generates the torch tokens."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from tests.passes.registry_examples import prompt

GEN = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0)


@pytest.mark.parametrize("recipe", ["evict(score='expected_attention', budget=8)",
                                    "evict(score='h2o', budget=8, window=2, when='every:3')"])
def test_evict_exports_and_gives_the_torch_tokens(onnx_artifact, recipe):
    cm, out = onnx_artifact("tiny-llama", recipe)
    ids, mask = prompt()
    want = cm.generate(ids, attention_mask=mask, **GEN)
    kept = cm.last_stats["kept_tokens_per_head"]
    assert max(h for layer in kept for row in layer for h in row) < 14 + 8  # it evicted
    assert torch.equal(gw.load(out).generate(ids, attention_mask=mask, **GEN), want)
