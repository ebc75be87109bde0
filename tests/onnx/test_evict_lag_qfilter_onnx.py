"""evict(score='lagkv' | 'qfilter') exports to ONNX: ``evict_scored_lag`` (a partition-size parameter) and
``evict_scored_qfilter`` (the layer's filters, a graph constant) stay on the runtime side of the split like every
eviction op, and ONNX Runtime generates the torch tokens."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from tests.passes.registry_examples import prompt

GEN = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0)


@pytest.mark.parametrize("recipe", ["evict(score='lagkv', budget=8, lag=3, sinks=2)", "evict(score='qfilter', budget=8)",
                                    "evict(score='qfilter', budget=8, when='every:3')"])
def test_lagkv_and_qfilter_export_and_give_the_torch_tokens(onnx_artifact, recipe):
    cm, out = onnx_artifact("tiny-llama", recipe)
    ids, mask = prompt()
    want = cm.generate(ids, attention_mask=mask, **GEN)
    kept = cm.last_stats["kept_tokens_per_head"]
    assert max(h for layer in kept for row in layer for h in row) < ids.shape[1] + 8  # it evicted
    assert torch.equal(gw.load(out).generate(ids, attention_mask=mask, **GEN), want)
