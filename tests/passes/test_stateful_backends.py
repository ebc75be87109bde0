"""Keyformer and Scissorhands beyond the torch backend.

ONNX (split: the policy op runs on the runtime side) and Triton / reference backends are covered by
the registry suites (``tests/onnx/test_registry_onnx.py``, ``tests/triton/test_registry_backends.py``:
tiny-llama, same greedy tokens as the torch backend). Here: the compiled backend runs both with an eager
fallback (``codegen/torch/static_fallback.py``: the op runs after the compiled decode graph) and gives the
torch backend's tokens; ``tests/codegen/test_compiled_fallback.py`` compares every step, Inductor included.
"""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from tests.conftest import _tiny, left_padded_batch


@pytest.mark.parametrize("recipe", ["keyformer(kv=12)", "scissorhands(budget=12, recent=2)"])
def test_compiled_backend_runs_them_with_the_torch_tokens(recipe):
    cm = gw.compile(_tiny("tiny-llama"), recipe=recipe, backend="compiled", verify=False)
    ref = gw.compile(_tiny("tiny-llama"), recipe=recipe, verify=False)
    cm._backend_step.compiler = lambda gm: gm  # the decode graph eagerly (Inductor: test_compiled_fallback.py)
    assert {r["op"].name().split("_")[-1] for r in cm._backend_step.fallback["records"]} == {recipe.split("(")[0]}
    ids, mask = left_padded_batch(256, [30, 21], seed=3)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]), want)
    assert cm.last_stats["kept_tokens_per_head"] == ref.last_stats["kept_tokens_per_head"]
