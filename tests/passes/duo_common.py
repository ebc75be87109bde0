"""Shared by the duo composition tests (``test_duo_h2o.py``, ``test_duo_snapkv.py``, ``test_duo_snapkv_adaptive.py``):
compiling a tiny model, reading state by name, and the "this pair behaves exactly like that one" check."""

from __future__ import annotations

import torch

import graphwright as gw
from tests.conftest import _tiny

GEN = dict(eos_token_id=[], pad_token_id=0)


def compile_tiny(recipe: str, backend: str = "torch", name: str = "tiny-llama"):
    return gw.compile(_tiny(name), recipe=recipe, backend=backend, verify=False)


def state_by_name(cm, state) -> dict:
    return {s.name: t for s, t in zip(cm.runtime_graph.state, state)}


def assert_generates_alike(a, b, ids, mask, new_tokens: int = 12) -> None:
    """``a`` and ``b`` generate the same greedy tokens from the batch and hold the same KV bytes after it."""
    assert torch.equal(a.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **GEN),
                       b.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **GEN))
    assert a.last_stats["kv_bytes"] == b.last_stats["kv_bytes"]
