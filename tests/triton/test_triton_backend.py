"""``backend="triton"``: whole tiny models on the Triton kernels give the torch backend's greedy tokens."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.codegen.triton import attention_triton, block_sparse_triton, latent_attention_triton
from graphwright.compiled import CompiledModel
from tests.conftest import left_padded_batch

NEW = 4


def _pair(tiny, name, recipe):
    """The same rewritten step graph lowered twice: torch backend and Triton backend."""
    cm = gw.compile(tiny(name), recipe=recipe, verify=False)
    return cm, CompiledModel(cm.step_graph, recipe=cm.recipe, backend="triton")


def _targets(cm) -> set:
    return {n.target for n in cm._lowered.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("recipe, emphasis", [
    ("steer(alpha=0.05, heads='all')", [(1, 5)]),
    ("h2o(heavy=4, recent=4)", None),
    ("lowrank_kv(keep=0.5)", None),  # absorbed values
    ("lowrank_kv(keep=0.5, value_path='reconstruct')", None),
    ("block_sparse(block=4, top_k=2, dense_layers=[])", None),
])
@pytest.mark.interpreter_only
def test_greedy_tokens_match_torch_backend(tiny, recipe, emphasis):
    ref, cm = _pair(tiny, "tiny-llama", recipe)
    kernel = {"lowrank_kv": latent_attention_triton, "block_sparse": block_sparse_triton}.get(recipe.split("(")[0],
                                                                                              attention_triton)
    assert kernel in _targets(cm)  # the kernels really run
    ids, mask = left_padded_batch(cm.info.vocab_size, [11, 7], seed=3)
    rows = None if emphasis is None else [emphasis, emphasis]
    want = ref.generate(ids, max_new_tokens=NEW, attention_mask=mask, emphasis=rows)
    got = cm.generate(ids, max_new_tokens=NEW, attention_mask=mask, emphasis=rows)
    assert torch.equal(got, want)
    if emphasis is not None:  # the emphasis really steers (so the kernels saw a key bias)
        assert not torch.allclose(ref.logits(ids, mask, emphasis=rows), ref.logits(ids, mask))


@pytest.mark.interpreter_only
def test_unknown_backend_names_the_choices(tiny):
    with pytest.raises(ValueError, match="triton"):
        gw.compile(tiny("tiny-llama"), backend="cuda")


@pytest.mark.interpreter_only
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from graphwright.codegen.triton import attention_triton as wrapper

    monkeypatch.delenv("TRITON_INTERPRET")
    x, pos = torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        wrapper(x, x, x, pos, pos, 1.0)
