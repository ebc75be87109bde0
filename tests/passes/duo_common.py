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


def hide_outside_streaming_window(kp: torch.Tensor, q: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """A streaming head's positions ``kp`` [B, S] with every key j >= sinks and q - j > window set to -1
    (hidden from the query at position ``q`` [B, 1]): ``test_duo.py``'s rule."""
    return kp.masked_fill((kp >= sinks) & (q - kp > window), -1)


def dense_stream_logits(ids, mask, prefill: int) -> torch.Tensor:
    """The plain dense model's logits, streamed through decode after ``prefill`` prompt tokens (reference backend)."""
    from graphwright.runtime.score import stream_logits

    dense = compile_tiny("", "reference")
    return stream_logits(dense._step, dense.runtime_graph.state, ids, mask, prefill)[0]
