"""A ragged-batch driver for the stateful eviction ops (Keyformer, Scissorhands) and their loop oracles, and the
model-level checks both passes' tests share (``generate_tiny``, ``assert_covering_budget_is_dense``,
``assert_lowrank_kv_and_steer_compose``).

``drive`` runs one eviction op like the runtime would on a left-padded batch: a prefill of the
prompts, then single-token steps, each step's outputs fed back. Queries and keys are drawn once per
*position* (``Q``, ``K`` tables), so a loop oracle can recompute any attention from positions alone,
whatever slot layout the op chose.
"""

from __future__ import annotations

import math

import torch

import graphwright as gw
from tests.conftest import _tiny, left_padded_batch

GEN = dict(eos_token_id=[], pad_token_id=0)


def tables(B, H, Hk, D, positions, seed):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(B, H, positions, D, generator=g) * 2
    K = torch.randn(B, Hk, positions, D, generator=g)
    V = torch.randn(B, Hk, positions, D, generator=g)
    return Q, K, V


def drive(op, extra, steps, lengths=(10, 6), H=4, Hk=2, D=8, seed=0):
    """Yield ``(i, q, q_pos, k_pos_in, outs, (Q, K))`` after every step (i = 0: prefill of the left-padded prompts)."""
    B, P = len(lengths), max(lengths)
    Q, K, V = tables(B, H, Hk, D, P + steps + 1, seed)
    q_pos = torch.full((B, P), -1, dtype=torch.long)
    for b, n in enumerate(lengths):
        q_pos[b, P - n:] = torch.arange(n)
    k = torch.zeros(B, Hk, 0, D)
    v = torch.zeros(B, Hk, 0, D)
    k_pos = torch.zeros(B, Hk, 0, dtype=torch.long)
    extra = list(extra)
    for i in range(steps + 1):
        if i > 0:
            q_pos = torch.tensor([[n + i - 1] for n in lengths])
        T = q_pos.shape[1]
        idx = q_pos.clamp(min=0)
        real = (q_pos >= 0)[:, None, :, None]
        q = Q.gather(2, idx[:, None, :, None].expand(B, H, T, D)) * real
        k = torch.cat([k, K.gather(2, idx[:, None, :, None].expand(B, Hk, T, D)) * real], 2)
        v = torch.cat([v, V.gather(2, idx[:, None, :, None].expand(B, Hk, T, D)) * real], 2)
        k_pos = torch.cat([k_pos, q_pos[:, None].expand(B, Hk, T)], 2)
        k_pos_in = k_pos
        k, v, k_pos, *extra = op(q, k, v, q_pos, k_pos, *extra)
        yield i, q, q_pos, k_pos_in, (k, v, k_pos, *extra), (Q, K)


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def kept(k_pos_out, b, h):
    return sorted(int(p) for p in k_pos_out[b, h] if p >= 0)


def generate_tiny(recipe, model="tiny-llama", lengths=(14, 9), new=32, **kw):
    """(compiled model, greedy tokens, ids, mask): ``recipe`` on a tiny model, ``new`` tokens from a left-padded batch."""
    cm = gw.compile(_tiny(model), recipe=recipe)
    ids, mask = left_padded_batch(cm.info.vocab_size, list(lengths), seed=2)
    return cm, cm.generate(ids, attention_mask=mask, max_new_tokens=new, **GEN, **kw), ids, mask


def assert_covering_budget_is_dense(recipe, model):
    """``recipe`` (a budget covering prompt + 32 new tokens) generates the dense model's tokens, holds its KV bytes
    and gives its prompt logits within 1e-4."""
    dense, want, ids, mask = generate_tiny(None, model)
    cm, got, _, _ = generate_tiny(recipe, model)
    assert torch.equal(got, want)
    assert cm.last_stats["kv_bytes"] == dense.last_stats["kv_bytes"]
    real = mask.bool()
    assert (cm.logits(ids, mask)[real] - dense.logits(ids, mask)[real]).abs().max() <= 1e-4


def assert_lowrank_kv_and_steer_compose(policy_exact, policy_lossy, bytes_below, policy_steered):
    """After ``lowrank_kv(keep=0.5)``: ``policy_exact`` (a budget covering the run) gives its tokens and
    ``policy_lossy`` holds under ``bytes_below`` of its KV bytes; ``policy_steered + steer`` generates with
    emphasis and the emphasis changes the logits."""
    ids, mask = left_padded_batch(256, [14, 9], seed=2)
    base = gw.compile(_tiny("tiny-llama"), recipe="lowrank_kv(keep=0.5)")
    want = base.generate(ids, attention_mask=mask, max_new_tokens=16, **GEN)
    exact = gw.compile(_tiny("tiny-llama"), recipe=f"lowrank_kv(keep=0.5) + {policy_exact}")
    assert torch.equal(exact.generate(ids, attention_mask=mask, max_new_tokens=16, **GEN), want)
    lossy = gw.compile(_tiny("tiny-llama"), recipe=f"lowrank_kv(keep=0.5) + {policy_lossy}")
    lossy.generate(ids, attention_mask=mask, max_new_tokens=16, **GEN)
    assert lossy.last_stats["kv_bytes"] < bytes_below * base.last_stats["kv_bytes"]
    emphasis = [[(2, 9)], [(1, 6)]]
    steered = gw.compile(_tiny("tiny-llama"), recipe=f"{policy_steered} + steer(heads='all', alpha=0.05)")
    toks = steered.generate(ids, attention_mask=mask, max_new_tokens=16, emphasis=emphasis, **GEN)
    assert toks.shape == (2, 14 + 16)
    assert not torch.allclose(steered.logits(ids, mask, emphasis=emphasis), steered.logits(ids, mask))
