"""Helpers shared by the eviction tests: random per-head caches, a manual decode loop, slow oracles."""

from __future__ import annotations

import dataclasses
import math

import torch

from graphwright.codegen.backends import EVICTION_REFERENCES, TORCH
from graphwright.codegen.torch.streaming_shift import streaming_rope_shift
from graphwright.compiled import CompiledModel
from graphwright.passes.base import PassContext
from graphwright.runtime import positions_from_mask
from tests.conftest import left_padded_batch

# The torch backend with the compacting reference eviction ops, on the step graph's own cache layout
# (pre-RoPE StreamingLLM keys: no streaming_rope_shift): what every slot / in-graph version is checked against.
COMPACTING = dataclasses.replace(TORCH, name="torch_compacting", table={**TORCH.table, **EVICTION_REFERENCES},
                                 transforms=tuple(t for t in TORCH.transforms if t is not streaming_rope_shift))


def random_step(B=2, H=4, Hk=2, S=12, T=1, D=8, seed=0, pad=(0, 3), holes=True):
    """Random q, k, v, q_pos, per-head k_pos for one step: S cached slots (with -1 holes) + T new tokens.

    Row b's cached slots hold increasing positions with some per-head holes (earlier evictions);
    ``pad[b]`` leading slots are left padding (-1). The T new tokens continue each row's positions.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hk, S + T, D, generator=g)
    v = torch.randn(B, Hk, S + T, D, generator=g)
    k_pos = torch.full((B, Hk, S + T), -1, dtype=torch.long)
    q_pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = S - pad[b]
        start = 2 * S  # positions beyond the slot count: earlier tokens were evicted
        for h in range(Hk):
            p = torch.arange(start - n, start)
            if holes:
                p = p.masked_fill(torch.rand(n, generator=g) < 0.2, -1)
            k_pos[b, h, pad[b]:S] = p
            k_pos[b, h, S:] = torch.arange(start, start + T)
        q_pos[b] = torch.arange(start, start + T)
    return q, k, v, q_pos, k_pos


def probs_oracle(q, k, q_pos, k_pos, scale):
    """P[b, h, t, s] by explicit loops (query head h, visible keys only, padding rows 0)."""
    B, H, T, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    P = torch.zeros(B, H, T, S)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                if q_pos[b, t] < 0:
                    continue
                vis = [s for s in range(S) if 0 <= k_pos[b, h // g, s] <= q_pos[b, t]]
                logits = torch.tensor([float(q[b, h, t] @ k[b, h // g, s]) * scale for s in vis])
                p = torch.softmax(logits, 0)
                for s, x in zip(vis, p):
                    P[b, h, t, s] = x
    return P


def colsum_oracle(q, k, q_pos, k_pos, scale):
    B, H = q.shape[:2]
    Hk = k.shape[1]
    P = probs_oracle(q, k, q_pos, k_pos, scale).sum(2)  # [B, H, S]
    return P.view(B, Hk, H // Hk, -1).mean(2)


def topk_oracle(scores, slots, k):
    """The k best slots by (-score, slot) from a python list."""
    return sorted(sorted(slots, key=lambda s: (-float(scores[s]), s))[:max(k, 0)])


def kept_positions(k_pos_out):
    """[B][Hk] lists of kept positions (in slot order) from a compacted positions tensor."""
    return [[[int(p) for p in row if p >= 0] for row in heads] for heads in k_pos_out]


def kept_sets(cm, state, layers=2):
    """Per layer, [B][Hk] sorted kept positions of ``cm``'s per-head positions state (``key_positions<layer>``)."""
    return [[[sorted(h) for h in row] for row in kept_positions(state_of(cm, state, f"key_positions{layer}"))]
            for layer in range(layers)]


def run_pass(cm, p, tokenizer=None):
    """A CompiledModel of pass ``p`` applied to a copy of ``cm``'s graph."""
    return CompiledModel(p.run(cm.step_graph.copy(), PassContext(tokenizer=tokenizer)), tokenizer=tokenizer)


@torch.inference_mode()
def decode_loop(cm, ids, mask, steps, on_step=None):
    """Greedy prefill + ``steps`` decode steps through cm's lowered step; returns (logits [steps+1, B, V], tokens, state).

    ``on_step(i, state)`` sees the state after every step (i = 0 is prefill).
    """
    state = getattr(cm, "runtime_graph", cm.step_graph).init_state(ids.shape[0])  # stand-ins (ONNX steps) run the captured layout
    pos = positions_from_mask(mask)
    logits, state = cm._step(ids, pos, torch.tensor([ids.shape[1] - 1]), state)
    out, toks = [logits[:, -1]], []
    nxt_pos = pos[:, -1:] + 1
    if on_step:
        on_step(0, state)
    for i in range(steps):
        nxt = out[-1].argmax(-1)
        toks.append(nxt)
        logits, state = cm._step(nxt[:, None], nxt_pos, torch.zeros(1, dtype=torch.long), state)
        nxt_pos = nxt_pos + 1
        out.append(logits[:, -1])
        if on_step:
            on_step(i + 1, state)
    toks = torch.stack(toks, 1) if toks else torch.zeros(ids.shape[0], 0, dtype=torch.long)
    return torch.stack(out), toks, state


def assert_exact_setting(cm, p, steps=32, lengths=(12, 7), seed=1):
    """Pass ``p`` in an exact setting decodes like ``cm``: on a left-padded batch, ``steps`` greedy decode steps give
    the same tokens and logits within 1e-4 (StreamingLLM's pre-RoPE round trip costs ~1e-6). Returns
    ``(the pass's model, ids, mask)``."""
    ids, mask = left_padded_batch(256, list(lengths), seed=seed)
    ev = run_pass(cm, p)
    want_logits, want, _ = decode_loop(cm, ids, mask, steps)
    got_logits, got, _ = decode_loop(ev, ids, mask, steps)
    assert torch.equal(got, want)
    assert (got_logits - want_logits).abs().max() <= 1e-4
    return ev, ids, mask


def state_of(cm, state, name):
    return state[[s.name for s in getattr(cm, "runtime_graph", cm.step_graph).state].index(name)]


def kept_after_prefill(cm, ids, mask, layers, steps=4):
    """(logits, {layer: kept positions}) of a ``steps``-step greedy ``decode_loop``, the kept sets read right after
    the prefill from each layer's ``key_positions{layer}`` state."""
    seen = {}

    def grab(i, st):
        if i == 0:
            seen.update({layer: kept_positions(state_of(cm, st, f"key_positions{layer}")) for layer in layers})

    logits, _, _ = decode_loop(cm, ids, mask, steps, on_step=grab)
    return logits, seen


def record_decode(m, lengths, steps, key_positions, also, seed=4):
    """(logits, tokens, kept sets per step [layer][row][head], ``also(m, state)`` per step): greedy ``decode_loop``
    of a left-padded random batch with real ``lengths``, recording after the prefill and every decode step the
    sorted kept positions of each ``key_positions`` state (one per layer) and whatever ``also`` reads."""
    sets, extra = [], []

    def on_step(i, state):
        sets.append([[[sorted(h) for h in row] for row in kept_positions(state_of(m, state, kp))] for kp in key_positions])
        extra.append(also(m, state))

    ids, mask = left_padded_batch(m.step_graph.info.vocab_size, lengths, seed=seed)
    logits, toks, _ = decode_loop(m, ids, mask, steps, on_step)
    return logits, toks, sets, extra


def floor_budget(frac, length):
    return math.floor(frac * length + 1e-9)


def op_decode_loop(op, extra_state, steps, B=1, H=4, Hk=2, D=8, prompt=10, seed=0, on_step=None):
    """Drive one eviction op like the runtime would, with random q/k/v: prefill ``prompt`` tokens, then
    ``steps`` single-token steps, feeding each step's outputs back. ``op(q, k, v, q_pos, k_pos, *extra)``
    returns ``(k, v, k_pos, *extra)``; ``on_step(length, k_pos, extra)`` checks each step."""
    g = torch.Generator().manual_seed(seed)
    k = torch.zeros(B, Hk, 0, D)
    v = torch.zeros(B, Hk, 0, D)
    k_pos = torch.zeros(B, Hk, 0, dtype=torch.long)
    extra = list(extra_state)
    pos = 0
    for i in range(steps + 1):
        T = prompt if i == 0 else 1
        q = torch.randn(B, H, T, D, generator=g) * 2
        q_pos = torch.arange(pos, pos + T).expand(B, T)
        k = torch.cat([k, torch.randn(B, Hk, T, D, generator=g)], 2)
        v = torch.cat([v, torch.randn(B, Hk, T, D, generator=g)], 2)
        k_pos = torch.cat([k_pos, q_pos[:, None].expand(B, Hk, T)], 2)
        k, v, k_pos, *extra = op(q, k, v, q_pos, k_pos, *extra)
        pos += T
        if on_step:
            on_step(pos, k_pos, extra)
    return k_pos, extra


def random_headset(info, folder, seed=0, zero_below=None):
    """(path, scores [L, Hk]): a head-set file of seeded random retrieval scores for a tiny model (``zero_below``:
    scores under it set to 0, like the shipped sets, where most heads score 0)."""
    from graphwright.heads.headset import HeadSet

    s = torch.rand(info.num_layers, info.num_kv_heads, generator=torch.Generator().manual_seed(seed))
    if zero_below is not None:
        s[s < zero_below] = 0.0
    hs = HeadSet(model="tiny", method="retrieval", scores=tuple(tuple(float(x) for x in r) for r in s), retrieval=frozenset())
    return str(hs.save(folder / f"heads{seed}.json")), s
