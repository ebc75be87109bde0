"""Shared op-level case of the StreamingLLM shift tests (torch backend and ONNX): unordered slots and
the step graph's composition they must equal."""

from __future__ import annotations

import torch

from graphwright.capture.ops import attention_reference
from graphwright.ops.rope_index_ref import _rotate, rope_angles, rope_cache_index_reference


def reference_layer(q_abs, k_abs, v, q_pos, k_pos, scale, inv):
    """The step graph's composition: invert q and keys at their positions, rotate by cache index (reference), attend."""
    ck, sk = rope_angles(k_pos, inv)
    k_pre = _rotate(k_abs, ck, -sk, 1.0)
    cq, sq = rope_angles(q_pos, inv)
    q_pre = _rotate(q_abs, cq[:, None], -sq[:, None], 1.0)
    order = torch.where(k_pos >= 0, k_pos, 1 << 40).argsort(dim=-1)  # the reference needs position order
    k_pre = k_pre.gather(2, order[..., None].expand_as(k_pre))
    v_o = v.gather(2, order[..., None].expand_as(v))
    kp_o = k_pos.gather(2, order)
    q_rot, k_rot = rope_cache_index_reference(q_pre, k_pre, kp_o, inv, 1.0)
    return attention_reference(q_rot, k_rot, v_o, q_pos, kp_o, scale)


def unordered_slot_case(evicted: int, sinks: int = 3, window: int = 6):
    """Unordered slots of 2 rows, GQA 4:2: sinks + a window of consecutive positions in random slots, two
    empty slots, the new token in the last slot (``cache_append``); row b has ``evicted + 3 b`` tokens
    evicted. Returns ``(q_abs, k_abs, v, q_pos, k_pos, inv_freq)``, q and k rotated at their positions."""
    g = torch.Generator().manual_seed(evicted)
    B, H, Hk, D = 2, 4, 2, 16
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    S = sinks + window + 1 + 2  # two empty slots
    k_pos = torch.full((B, Hk, S), -1, dtype=torch.long)
    q_pos = torch.zeros(B, 1, dtype=torch.long)
    for b in range(B):
        L = sinks + window + 1 + evicted + 3 * b  # row length with the new token
        cached = list(range(sinks)) + list(range(max(sinks, L - 1 - window), L))
        for h in range(Hk):
            slots = torch.randperm(S - 1, generator=g)[:len(cached) - 1]
            k_pos[b, h, slots] = torch.tensor(cached[:-1])
            k_pos[b, h, S - 1] = L - 1
        q_pos[b, 0] = L - 1
    k_pre, v = torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    q_pre = torch.randn(B, H, 1, D, generator=g)
    ck, sk = rope_angles(k_pos, inv)
    cq, sq = rope_angles(q_pos, inv)
    return _rotate(q_pre, cq[:, None], sq[:, None], 1.0), _rotate(k_pre, ck, sk, 1.0), v, q_pos, k_pos, inv
