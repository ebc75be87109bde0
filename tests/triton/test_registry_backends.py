"""Registry-driven backend suite: torch, reference and Triton (interpreter) give the same greedy tokens.

For every registered pass (``tests/passes/registry_examples.py``, so a new pass is covered without
editing this file): its lossy example (its exact one when it has none) on its first example model
is compiled once, and the same rewritten step graph is lowered to the ``"reference"`` and
``"triton"`` backends (``CompiledModel(cm.step_graph, ...)``); all three generate the same 8 greedy
tokens on a left-padded batch. The same holds for the compositions issue 16 names (latent layers
with steering, windows, block selection and streaming; eviction with steering; everything on an
MoE model); the cases are in ``tests/passes/backend_cases.py``. A steered recipe runs with emphasis
spans, and the test checks they change the logits, so the key bias really reaches the kernels.
"""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.compiled import CompiledModel
from tests.conftest import _tiny
from tests.passes.backend_cases import EMPHASIS, backend_cases, emphasis_for
from tests.passes.registry_examples import prompt

GEN = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0)
CASES = backend_cases()


def generate_all(model: str, recipe: str):
    """{backend: greedy tokens} for one step graph lowered to each backend; also the torch model."""
    cm = gw.compile(_tiny(model), recipe=recipe, verify=False)
    ids, mask = prompt()
    emphasis = emphasis_for(recipe)
    tokens = {"torch": cm.generate(ids, attention_mask=mask, emphasis=emphasis, **GEN)}
    for backend in ("reference", "triton"):
        other = CompiledModel(cm.step_graph, recipe=cm.recipe, backend=backend)
        tokens[backend] = other.generate(ids, attention_mask=mask, emphasis=emphasis, **GEN)
        if backend == "triton":  # the kernels really run: attention (of some kind) is a Triton kernel
            targets = {n.target for n in other._lowered.graph.nodes if n.op == "call_function"}
            assert any(getattr(t, "__module__", "").startswith("graphwright.codegen.triton") for t in targets)
    return cm, tokens


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.interpreter_only
def test_backends_give_the_same_tokens(case):
    model, recipe = CASES[case]
    cm, tokens = generate_all(model, recipe)
    ids, mask = prompt()
    assert tokens["torch"].shape == (2, ids.shape[1] + GEN["max_new_tokens"])
    for backend in ("reference", "triton"):
        assert torch.equal(tokens[backend], tokens["torch"]), (backend, tokens[backend], tokens["torch"])
    if emphasis_for(recipe):  # the emphasis really steers, so every backend saw a key bias
        steered = cm.logits(ids, mask, emphasis=EMPHASIS)
        assert not torch.allclose(steered, cm.logits(ids, mask))
