"""``graphwright.evict_adakv_shares``: SnapKV with per-(layer, KV head) budgets from head scores, on the packed cache.

What ``snapkv(heads="scores")`` runs (``passes/snapkv.py``). Scoring is SnapKV's (arXiv 2404.14469): the last
``window`` prompt queries' fp32 softmax summed over the window, GQA mean, 1-D pooling over the prefix (the same
``adakv_ref.snap_window`` as ``adakv_ref.adakv_keep``). The budget differs: head h of this layer keeps b_h tokens, its
window included, where (b_h) over every evicted (layer, KV head) pair is ``head_shares.head_shares(weights,
H * budget, n, floor)`` -- the model's total budget spread in proportion to the head-score weights, each head
capped at the row's prompt length n and at least ``floor`` tokens. ``weights`` is the flat list over the evicted
layers (row-major, Hk per layer) and ``slot`` this layer's index among them; the shares depend on n only, so
every layer's op computes the same table (cached). A row with n <= budget keeps everything. Runs once after
prefill; decode appends (``k.shape[2] != Hk * T``). Layout, packing and compaction: ``adakv_ref``.

Exact settings (tested in ``tests/passes/test_snapkv_shares.py``): equal weights (gamma = 0) give every head
``budget`` tokens, i.e. uniform SnapKV's kept sets; budget >= n keeps everything.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adakv_ref import compact_packed, packed_fake, snap_window, unpack_prefill
from .eviction_policy import EVICT_OPS, REFERENCES
from .head_shares import check_slot, layer_counts


def shares_keep(q, k, q_pos, k_pos, scale, budget_: int, window: int, kernel: int, pool: str, weights, slot: int,
                floor: int) -> torch.Tensor:
    """[B, Hk, S] bool keep set on the dense per-head layout at prefill (k [B, Hk, S, D], k_pos [B, Hk, S])."""
    hk = k.shape[1]
    check_slot("evict_adakv_shares", weights, slot, hk)
    sw = snap_window(q, k, q_pos, k_pos, scale, window, kernel, pool)

    def counts_of(b, nb):
        return torch.tensor(layer_counts(weights, slot, hk, budget_, nb, sw.w, floor), device=k.device)

    return sw.keep(budget_, k_pos, counts_of)


def adakv_shares_reference(q, k, v, q_pos, k_pos, scale, budget_, window, kernel, pool, weights, slot, floor):
    """-> (k, v, k_pos) packed: compressed once after prefill (cache was empty), appended unchanged at decode."""
    T = q.shape[2]
    hk = k_pos.shape[1]
    if k.shape[2] != hk * T:  # decode, or a prompt over a non-empty cache: append only (SnapKV)
        return k, v, k_pos
    kd, kpd = unpack_prefill(k, k_pos, T)
    keep = shares_keep(q, kd, q_pos, kpd, scale, budget_, window, kernel, pool, weights, slot, floor)
    return compact_packed(keep.reshape(keep.shape[0], hk * T), k, v, k_pos)


@torch.library.custom_op("graphwright::evict_adakv_shares", mutates_args=())
def evict_adakv_shares(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, budget: int,
                       window: int, kernel: int, pool: str, weights: list[float], slot: int,
                       floor: int) -> tuple[Tensor, Tensor, Tensor]:
    """SnapKV with head-score budget shares on packed slots: compress once after prefill; decode appends."""
    outs = adakv_shares_reference(q, k, v, q_pos, k_pos, scale, budget, window, kernel, pool, weights, slot, floor)
    ids = {id(k), id(v), id(k_pos)}
    return tuple(o.clone() if id(o) in ids else o for o in outs)


@evict_adakv_shares.register_fake
def _(q, k, v, q_pos, k_pos, scale, budget, window, kernel, pool, weights, slot, floor):
    return packed_fake(k, v, k_pos)


EVICT_ADAKV_SHARES = torch.ops.graphwright.evict_adakv_shares.default
EVICT_OPS.append(EVICT_ADAKV_SHARES)
REFERENCES[EVICT_ADAKV_SHARES] = adakv_shares_reference
