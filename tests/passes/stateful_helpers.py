"""A ragged-batch driver for the stateful eviction ops (Keyformer, Scissorhands) and their loop oracles.

``drive`` runs one eviction op like the runtime would on a left-padded batch: a prefill of the
prompts, then single-token steps, each step's outputs fed back. Queries and keys are drawn once per
*position* (``Q``, ``K`` tables), so a loop oracle can recompute any attention from positions alone,
whatever slot layout the op chose.
"""

from __future__ import annotations

import math

import torch


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
