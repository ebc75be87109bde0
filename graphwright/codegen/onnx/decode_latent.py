"""In-graph decode eviction on latent caches (``lowrank_kv`` + H2O / StreamingLLM) for ``decode.onnx``.

A latent layer stores one payload for all KV heads (``c_k``/``c_v`` [B, S, r], fed to the eviction
op as v [B, 1, S, 2r]) beside per-head key positions and scores [B, Hk, S]. Its reference keeps
the *union* of the heads' sets (``eviction_ref.compact``: a slot stays for every head if any head
keeps it), so every head holds the same positions. On slots, at a decode step (the new token at
slot S of S + 1, ``cache_append``):

* each head's keep mask is the reference's selection computed over unordered slots (H2O: the last
  ``recent`` positions plus the top ``heavy`` running scores among the older ones; StreamingLLM:
  the first ``sinks`` and last ``window`` positions), then the union over heads;
* every slot not in the union gets position -1 (several may leave in one step: each head can drop
  a different token), then the new token's row moves (ScatterElements) into the first empty slot
  of 0..S-1, or stays at slot S (dropped) when the union does not keep it; the output is the
  first S slots, so the state keeps its shape;
* the H2O top-k breaks ties by position as the reference does on its position-ordered cache:
  the scores are gathered into position order (a sort of the [B, Hk, S] positions) and ranked
  with a stable descending sort (ONNX TopK, whose ties go to the lower index), then the rank is
  scattered back to slot order. k/v are never sorted or gathered.

The union size is data dependent (up to Hk * heavy + recent), so these layers have no fixed
capacity: the runtime keeps S >= 1 + the largest kept count before each step
(``decode_slots.pad_to_capacity`` with ``grow``), which leaves every head an empty slot for the
new token. Fraction budgets are computed in the graph from the row length (``eviction_ref.budget``).

Invariant tested (``tests/onnx/test_onnx_decode_dynamic.py``): the in-graph decode keeps the same
position sets per (row, KV head) as the compacting references over 60+ decode steps (tiny Llama,
batch 2 left-padded), logits within 1e-4; ``topk_by_position`` equals ``eviction_ref.topk_mask``
on shuffled slots with tied scores.
"""

from __future__ import annotations

import torch

from ...ops.eviction_ref import PUNCT, SPECIAL, budget, streaming_keep
from ...ops.fastgen_ref import FULL
from ..torch.eviction_slots import decode_colsum


def topk_by_position(score, cand, k_pos, k) -> torch.Tensor:
    """[B, Hk, S] bool: ``eviction_ref.topk_mask`` on unordered slots (the ``k`` [B] highest scores
    among ``cand``; equal scores go to the earlier position)."""
    B, Hk, S = k_pos.shape
    key = torch.where(k_pos >= 0, k_pos, torch.full_like(k_pos, torch.iinfo(torch.int64).max))
    s = score.float().masked_fill(~cand, float("-inf"))
    if torch.compiler.is_exporting():  # ONNX TopK: equal values in index order (aten.sort.stable has no translation)
        # slot indices in position order (valid positions are unique; the order among empty slots does not
        # matter: they are no candidates). TopK, not argsort: the exporter decomposes aten.argsort, which forces
        # its whole-program decomposition retrace (exporter_shortcuts.py; ~55 of 130 CPU s of a SmolLM2 export).
        order = torch.topk(key, S, dim=-1, largest=False).indices
        s = s.gather(-1, order)
        by_score = torch.topk(s, S, dim=-1).indices
    else:
        order = key.argsort(dim=-1)  # slot indices in position order (valid positions are unique)
        s = s.gather(-1, order)
        by_score = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ar = torch.arange(S, device=k_pos.device).expand(B, Hk, S)
    rank_in_order = torch.zeros_like(order).scatter(-1, by_score, ar)
    rank = torch.zeros_like(order).scatter(-1, order, rank_in_order)
    return cand & (rank < k.view(B, 1, 1))


def union_place(keep, k, v, k_pos, extras=(), union: bool = True):
    """Empty every slot not kept (``union``: by no head; else per head), move the new token (slot S)
    into the first empty slot of 0..S-1 unless it left, return the first S slots of (k, v, k_pos,
    *extras). A tensor with one head (a latent payload [B, 1, S+1, ...]) takes head 0's slot, which
    is every head's slot when ``union`` (then all heads share k_pos)."""
    B, Hk, S1 = k_pos.shape
    S = S1 - 1
    keep = keep.any(dim=1, keepdim=True) if union else keep
    k_pos = k_pos.masked_fill(~(keep & (k_pos >= 0)), -1)
    first = (k_pos[..., :S] < 0).to(torch.int32).argmax(dim=-1)  # [B, Hk]: first empty slot
    j = torch.where(k_pos[..., S] < 0, torch.full_like(first, S), first).long()
    out = []
    for x in (k, v, k_pos, *extras):
        jx = j[:, :1] if x.shape[1] == 1 else j
        idx = jx.view(B, x.shape[1], 1, *([1] * (x.dim() - 3))).expand(B, x.shape[1], 1, *x.shape[3:])
        out.append(x.scatter(2, idx, x[:, :, S:]).narrow(2, 0, S))
    return tuple(out)


def h2o_latent_decode(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """``evict_h2o`` at a decode step on a latent layer's slots. -> (k, v, k_pos, score)."""
    B, Hk, _ = k_pos.shape
    score = torch.cat([score.float(), score.new_zeros(B, Hk, 1)], 2) + decode_colsum(q, k, q_pos, k_pos, scale, key_bias)
    length = q_pos.max(dim=1).values + 1
    valid = k_pos >= 0
    recent = valid & (k_pos >= (length - budget(recent_n, recent_f, length))[:, None, None])
    keep = recent | topk_by_position(score, valid & ~recent, k_pos, budget(heavy_n, heavy_f, length))
    return union_place(keep, k, v, k_pos, (score,))


def streaming_latent_decode(k, v, q_pos, k_pos, sinks, window):
    """``evict_streaming`` at a decode step on a latent layer's slots. -> (k, v, k_pos)."""
    return union_place(streaming_keep(k_pos, q_pos.max(dim=1).values + 1, sinks, window), k, v, k_pos)


def fastgen_decode(q, k, v, q_pos, k_pos, score, token_class, new_class, policy, scale, recovery,
                   local_n, local_f, frequent_n, frequent_f, criterion, force, key_bias=None):
    """``evict_fastgen`` at a decode step (policies profiled at prefill, ``policy`` [B, Hk, 1]) on per-head
    slots: ``fastgen_ref.fastgen_keep``'s union for each head's policy over unordered slots (the frequent
    top-k by ``topk_by_position``), every other slot emptied (several may leave), the new token into the
    first empty slot. -> (k, v, k_pos, score, token_class, policy)."""
    B, Hk, _ = k_pos.shape
    score = torch.cat([score.float(), score.new_zeros(B, Hk, 1)], 2) + decode_colsum(q, k, q_pos, k_pos, scale, key_bias)
    cls = torch.cat([token_class, new_class.to(token_class.dtype)[:, None, :].expand(B, Hk, 1)], 2)
    length = q_pos.max(dim=1).values + 1
    valid, p = k_pos >= 0, policy[..., :1]  # [B, Hk, 1] (the slice: export traces every state with the same seq length)
    keep = (cls == SPECIAL) | ((p >= 1) & (cls == PUNCT)) | (p >= FULL)
    keep = keep | ((p >= 2) & topk_by_position(score, valid, k_pos, budget(frequent_n, frequent_f, length)))
    keep = keep | ((p >= 3) & ((length[:, None, None] - 1 - k_pos) < budget(local_n, local_f, length)[:, None, None]))
    return (*union_place(keep, k, v, k_pos, (score, cls), union=False), p)  # p: a Slice, not the graph input itself
