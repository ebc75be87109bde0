"""Scissorhands as an eviction policy (arXiv 2305.17118): reference ``scissorhands_reference``.

Technique (``../shared/ALGORITHMS-2.md`` §8, the counting form of the reproduction
AnswerDotAI/cold-compress ``KVCacheHeavyHitter``; no official code exists): "persistence of
importance". At every step, per (batch row, KV head) and cached slot j, the indicator
u_t[j] = 1[A_t[j] >= 1 / n_t] is recorded, with n_t the slots the head holds this step (the cache
plus this step's tokens) and A_t[j] the attention j received, averaged over the g query heads of
the KV head and, at a step of T > 1 tokens (prefill), summed over the rows and divided by the rows
that see j. A ring buffer keeps each slot's last m indicators; importance I[j] = (ones in the
ring) / min(recorded, m). When the head holds more than budget - 1 slots after the step, the
lowest-I slots are dropped among those neither a sink (position < ``sinks``) nor among the last
``recent`` positions; ties (e.g. all zero) drop the oldest. The next step's token then takes the
freed slot, so attention never sees more than ``budget`` tokens. Dropped slots are removed from
the cache (real eviction: k, v and the ring buffer shrink).

State (per layer, compacted with the cache):

* ``bits`` [B, Hk, S, ceil(m / 8)] uint8: the ring of the last m indicators, *packed* 8 per byte.
  The unpacked form costs m bytes per slot and head (400 at m = 400: more than the slot's K and V
  at D = 64 in fp16); a "count + ring index" alone cannot work, because the indicator that leaves
  the window m steps later must be known to subtract it. Bit position = step t mod m.
* ``count`` [B, Hk, S] int32: indicators recorded for the slot, capped at m (a new slot starts at 0).
* ``step`` [B, Hk, 1] long (head state, empty before the first step): the ring index t.

Budget: an int token count per KV head (the paper's fixed budget B). Exact setting: budget >=
total length (prompt + new tokens): nothing is dropped. Invariant tested
(``tests/passes/test_scissorhands.py``): the kept sets equal a per-step loop with Python lists of
histories over hundreds of steps on a ragged batch of 2; identity at the exact setting.
"""

from __future__ import annotations

import torch

from .eviction_policy import EvictionPolicy, HeadState, Param, SlotState, register_policy
from .eviction_ref import colsum, compact, row_length

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def ring_bytes(history: int) -> int:
    """Bytes per slot of a packed ring of ``history`` indicator bits."""
    return -(-int(history) // 8)


def popcount(bits: torch.Tensor) -> torch.Tensor:
    """[..., W] uint8 -> [...] int32: number of set bits."""
    return _POPCOUNT.to(bits.device)[bits.long()].sum(dim=-1, dtype=torch.int32)


def indicators(q, k, q_pos, k_pos, scale, key_bias=None) -> torch.Tensor:
    """[B, Hk, S] bool: u[j] = (mean over the rows that see j of A[j]) >= 1 / n (n = the head's slots)."""
    total = colsum(q, k, q_pos, k_pos, scale, key_bias)  # sum over real rows, mean over g
    rows = ((q_pos[:, None, None, :] >= 0) & (q_pos[:, None, None, :] >= k_pos[..., None]) & (k_pos[..., None] >= 0)).sum(-1)
    n = (k_pos >= 0).sum(dim=-1, keepdim=True)
    mean = total.double() / rows.clamp(min=1)
    return (rows > 0) & (mean * n >= 1.0)  # A >= 1/n, without rounding 1/n


def record(bits, count, u, valid, step: int, history: int):
    """Write u at ring position step mod m for the valid slots; -> (bits, count)."""
    r = step % history
    byte, mask = r // 8, 1 << (r % 8)
    col = bits[..., byte]
    col = torch.where(valid, (col & (255 - mask)) | (u.to(torch.uint8) * mask), col)
    bits = bits.clone()
    bits[..., byte] = col
    count = torch.where(valid, (count + 1).clamp(max=history), count)
    return bits, count


def scissorhands_keep(imp, k_pos, length, budget: int, recent: int, sinks: int) -> torch.Tensor:
    """[B, Hk, S] bool: drop the n - (budget - 1) lowest-importance unprotected slots (ties: oldest first)."""
    valid = k_pos >= 0
    protected = (k_pos < sinks) | (k_pos >= (length - recent)[:, None, None])
    cand = valid & ~protected
    drop_n = (valid.sum(-1) - (budget - 1)).clamp(min=0)  # [B, Hk]
    big = torch.iinfo(torch.long).max
    by_pos = torch.sort(k_pos.masked_fill(~cand, big), dim=-1, stable=True).indices
    key = imp.double().masked_fill(~cand, float("inf")).gather(-1, by_pos)
    order = by_pos.gather(-1, torch.sort(key, dim=-1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return valid & ~(cand & (rank < drop_n[..., None]))


def scissorhands_reference(q, k, v, q_pos, k_pos, bits, count, step, scale, budget, history, recent, sinks, key_bias=None):
    """Record this step's indicators, then drop to budget - 1 slots -> (k, v, k_pos, bits, count, step)."""
    B, Hk, S = k.shape[:3]
    new = S - bits.shape[2]
    bits = torch.cat([bits, bits.new_zeros(B, Hk, new, ring_bytes(history))], dim=2)
    count = torch.cat([count, count.new_zeros(B, Hk, new)], dim=2)
    t = 0 if step.shape[-1] == 0 else int(step[0, 0, 0])
    valid = k_pos >= 0
    u = indicators(q, k, q_pos, k_pos, scale, key_bias)
    bits, count = record(bits, count, u, valid, t, history)
    imp = popcount(bits).double() / count.clamp(min=1)
    keep = scissorhands_keep(imp, k_pos, row_length(q_pos), budget, recent, sinks)
    return (*compact(keep, k, v, k_pos, (bits, count)), torch.full((B, Hk, 1), t + 1, dtype=torch.long, device=k.device))


SCISSORHANDS_POLICY = EvictionPolicy(
    name="scissorhands",
    reference=scissorhands_reference,
    slot_state=(SlotState("bits", torch.uint8, state="scissorhands_bits", trailing=True),
                SlotState("count", torch.int32, state="scissorhands_count")),
    head_state=(HeadState("step", torch.long, width=1, state="scissorhands_step"),),
    params=(Param("budget", "int"), Param("history", "int"), Param("recent", "int"), Param("sinks", "int")),
    doc="Scissorhands: drop the slots least often above-average in attention over the last m steps.",
)
EVICT_SCISSORHANDS = register_policy(SCISSORHANDS_POLICY)
