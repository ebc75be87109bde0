"""Key re-rotation after eviction: the kept keys moved to positions 0..n-1 (kvpress ``KeyRerotationPress``).

Technique: kvpress ``KeyRerotationPress`` (it wraps any scorer press; ``FinchPress``'s default
``rerotate_keys=True``; Finch is Corallo & Papotti, TACL 2024, doi 10.1162/tacl_a_00716; the same
re-rotation as StreamingLLM's cache-index positions, arXiv 2309.17453). Keys are cached post-RoPE, rotated
at their original positions p. Once an eviction has kept n of a head's keys, each kept key moves to
j = its rank by position among the kept keys of its row and head, and is rotated by (j - p). RoPE is a
rotation, R(j) = R(j - p) R(p), so the key becomes the one the model computes at position j (up to fp32
rounding). Its position becomes j. Later tokens continue at n, n+1, ...; that part is the runtime's
(``runtime/rerotate.py``).

``graphwright.rerotate_keys(k, k_pos, inv_freq) -> (k', k_pos')``:
* k [B, Hk, S, D] is post-RoPE at k_pos [B, Hk, S]; -1 marks an empty slot, which is not moved and keeps -1;
* the first R = 2 * len(inv_freq) dims rotate (rotate_half convention), and the rest pass through;
* the model's attention scaling (transformers' ``attention_scaling``) is already in the key and is not
  applied again;
* the angles are fp32(delta * inv_freq), as kvpress's ``_rerotate_cos_sin`` computes them.

Where every head's positions already are 0..n-1, the inputs come back unchanged. That is the case at a
decode step after a re-rotated prefill, and wherever nothing was evicted. It is bit for bit what the
rotation by 0 gives (cos 0 = 1, sin 0 = 0), and it costs one reduction over the positions.

Exact setting: nothing evicted (positions 0..L-1) is the identity, bit for bit.
Invariants tested (``tests/ops/test_rerotate.py``):
* the op equals a per-slot loop oracle (each dim pair rotated as a complex number) on random holes and padding;
* re-rotating RoPE(k, p) gives RoPE(k, j) within 1e-5, partial rotary included;
* the new positions are ranks by position, not slot order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .eviction_policy import REFERENCES
from .rope_index_ref import _rotate


def contiguous(k_pos: Tensor) -> bool:
    """True when every (row, head) holds exactly the positions 0..n-1 (n its valid slots): nothing to move."""
    if k_pos.shape[-1] == 0:
        return True
    return bool((k_pos.amax(dim=-1) + 1 == (k_pos >= 0).sum(dim=-1)).all())


def ranks(k_pos: Tensor) -> Tensor:
    """[B, Hk, S] long: each valid slot's rank by position among its row and head's valid slots; -1 elsewhere."""
    valid = k_pos >= 0
    key = torch.where(valid, k_pos, torch.iinfo(k_pos.dtype).max)
    order = key.argsort(dim=-1, stable=True)
    idx = torch.arange(k_pos.shape[-1], device=k_pos.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, idx)
    return torch.where(valid, rank, -1)


def rerotate_keys_reference(k: Tensor, k_pos: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """(k rotated by (rank - position), ranks) per slot; the inputs themselves when there is nothing to move."""
    if contiguous(k_pos):
        return k, k_pos
    new = ranks(k_pos)
    delta = torch.where(k_pos >= 0, new - k_pos, 0)
    freqs = delta.float()[..., None] * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return _rotate(k, emb.cos(), emb.sin(), 1.0), new


@torch.library.custom_op("graphwright::rerotate_keys", mutates_args=())
def rerotate_keys(k: Tensor, k_pos: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """Kept post-RoPE keys k [B, Hk, S, D] at k_pos [B, Hk, S] moved to positions 0..n-1 per row and head."""
    out, pos = rerotate_keys_reference(k, k_pos, inv_freq)
    return (out.clone() if out is k else out), (pos.clone() if pos is k_pos else pos)  # a custom op may not alias


@rerotate_keys.register_fake
def _(k, k_pos, inv_freq):
    return torch.empty_like(k), torch.empty_like(k_pos)


REROTATE_KEYS = torch.ops.graphwright.rerotate_keys.default
REFERENCES[REROTATE_KEYS] = rerotate_keys_reference  # lowered graphs call the reference (no copy at decode)
