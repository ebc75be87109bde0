"""Keyformer and Scissorhands beyond the torch backend.

ONNX (split: the policy op runs on the runtime side) and Triton / reference backends are covered by
the registry suites (``tests/onnx/test_registry_onnx.py``, ``tests/triton/test_registry_backends.py``:
tiny-llama, same greedy tokens as the torch backend). Here: the compiled backend refuses both, with
the reason (their per-step state has no static decode translation).
"""

from __future__ import annotations

import pytest

import graphwright as gw
from tests.conftest import _tiny


@pytest.mark.parametrize("recipe", ["keyformer(kv=12)", "scissorhands(budget=12, recent=2)"])
def test_compiled_backend_refuses_with_the_reason(recipe):
    name = recipe.split("(")[0]
    with pytest.raises(ValueError, match=rf"backend='compiled' cannot run this recipe: .*{name} \(layer 0\): no static decode translation"):
        gw.compile(_tiny("tiny-llama"), recipe=recipe, backend="compiled")
