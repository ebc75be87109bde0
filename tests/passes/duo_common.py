"""Shared by the duo composition tests (``test_duo_h2o.py``, ``test_duo_snapkv.py``, ``test_duo_snapkv_adaptive.py``):
compiling a tiny model, reading state by name, the "this pair behaves exactly like that one" checks, and the
combined-mask oracle harness (dense attention with each head's hidden keys masked, decode step by decode step)."""

from __future__ import annotations

from typing import Callable

import torch

import graphwright as gw
from graphwright.capture.step_graph import positions_from_mask
from graphwright.runtime.score import stream_logits
from tests.conftest import _tiny, left_padded_batch

GEN = dict(eos_token_id=[], pad_token_id=0)
# The oracle's batch: 2 rows left-padded (80 and 73 tokens), a 24-token prefill, then 56 teacher-forced decode steps.
PROMPT, PREFILL = dict(lengths=(80, 73), seed=3), 24
# The small batch of the equivalence checks.
SMALL = dict(lengths=(30, 22), seed=1)
EVERY_HEAD_RETRIEVAL = "duo(retrieval=[[0, 0], [0, 1], [1, 0], [1, 1]], sinks=0, window=1)"


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
    dense = compile_tiny("", "reference")
    return stream_logits(dense._step, dense.runtime_graph.state, ids, mask, prefill)[0]


def prompt_keys(kp: torch.Tensor, positions: torch.Tensor, prefill: int = PREFILL) -> torch.Tensor:
    """[B, S] bool: held keys of one head's positions ``kp`` [B, S] that came with the ``prefill`` prompt columns."""
    return (kp >= 0) & (kp < positions[:, prefill - 1:prefill] + 1)


# hidden(layer, head, kp [B, S], state by name, t, positions [B, T]) -> [B, S] bool: the keys a retrieval head's
# policy does not hold before decode step t (the query at column t)
RetrievalHidden = Callable[[int, int, torch.Tensor, dict, int, torch.Tensor], torch.Tensor]


def combined_mask_logits(masked_recipe: str, retrieval: set, hidden: RetrievalHidden, sinks: int, window: int):
    """(logits under the combined mask, plain dense logits) over the ``PROMPT`` batch, ``PREFILL`` then decode.

    ``masked_recipe`` compiles (reference backend) to per-head key positions with nothing evicted; before every
    decode step the positions a head must not see are set to -1 (masked): on a retrieval head ``(layer, kv_head)``
    in ``retrieval`` those ``hidden`` names, on a streaming head those outside sinks + window for the next query.
    """
    ids, mask = left_padded_batch(256, **PROMPT)
    masked = compile_tiny(masked_recipe, "reference")
    names = [s.name for s in masked.runtime_graph.state]
    layers = sum(n.startswith("key_positions") for n in names)
    positions = positions_from_mask(mask)
    step_at = iter(range(PREFILL, ids.shape[1] + 1))

    def oracle(i, p, idx, state):
        state = list(state)
        if i.shape[1] == 1:  # a decode step: hide what the combined cache does not hold
            t = next(step_at)
            q = positions[:, t][:, None]  # [B, 1]: the query's position
            by_name = dict(zip(names, state))
            for layer in range(layers):
                j = names.index(f"key_positions{layer}")
                kp = state[j].clone()  # [B, Hk, S]
                for h in range(kp.shape[1]):
                    if (layer, h) in retrieval:
                        kp[:, h] = kp[:, h].masked_fill(hidden(layer, h, kp[:, h], by_name, t, positions), -1)
                    else:
                        kp[:, h] = hide_outside_streaming_window(kp[:, h], q, sinks, window)
                state[j] = kp
        return masked._step(i, p, idx, state)

    want, _ = stream_logits(oracle, masked.runtime_graph.state, ids, mask, PREFILL)
    return want, dense_stream_logits(ids, mask, PREFILL)


def stream_against_oracle(cm, want: torch.Tensor, plain: torch.Tensor) -> dict:
    """Streams ``cm`` over the oracle's batch; asserts its logits are the combined mask's (1e-4) and that the mask
    really acts (> 0.1 from the plain dense logits). Returns the final state by name."""
    ids, mask = left_padded_batch(256, **PROMPT)
    got, state = stream_logits(cm._step, cm.runtime_graph.state, ids, mask, PREFILL)
    real = mask.bool()
    assert (got - want)[real].abs().max().item() <= 1e-4
    assert (got - plain)[real].abs().max().item() > 0.1  # the mask really acts on these steps
    return state_by_name(cm, state)


def assert_budget_covering_is_duo_alone(duo: str, policy: str, prefill: int | None = 12):
    """``duo + policy`` (a budget covering the ``SMALL`` batch) is ``duo`` alone: logits within 1e-5 (streamed
    after ``prefill`` tokens; None: the whole prompt's logits), the same greedy tokens and the same KV bytes."""
    ids, mask = left_padded_batch(256, **SMALL)
    both, alone = compile_tiny(f"{duo} + {policy}"), compile_tiny(duo)
    if prefill is None:
        a, b = both.logits(ids, attention_mask=mask), alone.logits(ids, attention_mask=mask)
    else:
        a, _ = stream_logits(both._step, both.runtime_graph.state, ids, mask, prefill)
        b, _ = stream_logits(alone._step, alone.runtime_graph.state, ids, mask, prefill)
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-5
    assert_generates_alike(both, alone, ids, mask)


def assert_all_heads_retrieval_is_policy_alone(policy: str, name: str) -> None:
    """duo with every KV head retrieval, then ``policy``, is ``policy`` alone: the same state layout, greedy tokens
    and KV bytes on the ``SMALL`` batch."""
    ids, mask = left_padded_batch(256, **SMALL)
    both, alone = compile_tiny(f"{EVERY_HEAD_RETRIEVAL} + {policy}", name=name), compile_tiny(policy, name=name)
    assert [s.name for s in both.step_graph.state] == [s.name for s in alone.step_graph.state]
    assert_generates_alike(both, alone, ids, mask)


def kv_bytes_after_generate(recipe: str) -> tuple:
    """(KV bytes, kept tokens per head) after 10 new tokens from the ``SMALL`` batch; the caches are fp32 K and V of
    head dim 16 on 2 rows, so one held token on one KV head costs ``TOKEN_BYTES``."""
    ids, mask = left_padded_batch(256, **SMALL)
    cm = compile_tiny(recipe)
    cm.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    return cm.last_stats["kv_bytes"], cm.last_stats["kept_tokens_per_head"]


TOKEN_BYTES = 2 * 16 * 2 * 4  # B rows * head dim * (K and V) * fp32
