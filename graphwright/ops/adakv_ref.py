"""Pure-torch reference of head-adaptive (Ada-KV) and per-layer (PyramidKV) SnapKV on a packed cache.

Techniques: Ada-KV (arXiv 2407.11550, FFY0/AdaKV ``AdaptiveSnapKVCluster``) spreads a layer's total
budget Hk*C over its KV heads by the global top-(Hk*C) of the window scores, then applies the
safeguard n_h <- round((1 - floor) * n_h + floor * C); PyramidKV (arXiv 2406.02069) gives layer l
the prefix budget C_l = k_max - l * step (k_min = C/beta, k_max = 2C - k_min, clamped to the prompt,
integer step), the same total. Both run once, after prefill; decode appends. Spec:
``ALGORITHMS-2.md`` §3, §4.

Packed layout (what ``snapkv(heads="adaptive")`` or ``snapkv(pyramid=...)`` layers hold): per layer
one buffer k, v [B, 1, N, D] holding every KV head's slots, and per-head positions k_pos [B, Hk, N]
where a slot has its position in the row of the head that owns it and -1 in every other row (-1
everywhere = empty). So a layer holds sum_h n_h slots (plus batch padding to the longest row), not
Hk times the largest head. Attention reads the buffer expanded to Hk heads (a view): a head's mask
hides the other heads' slots. A step's T new tokens enter as Hk*T slots, head-major
(``pack_heads``, ``packed_positions``).

At prefill (the cache was empty: N = Hk*T) the packed slots are the dense [B, Hk, T] layout
flattened head-major, so scoring is SnapKV's (``eviction_ref.colsum`` of the last ``window``
queries, fp32, GQA mean, 1-D pooling over the prefix); then each head keeps its top-n_h prefix
positions plus the window, and ``compact_packed`` gathers the kept slots of a row to the front.
Ties: the global top-k and each head's top-k go to the lower flat index (head, then position).

``split="kvpress"`` replaces the official safeguard by NVIDIA kvpress's ``AdaKVPress`` rule
(``kvpress_counts``): each head's top int(floor * (C + window)) tokens are forced -- the window
scores highest, so the window counts towards them -- then the layer's remaining budget goes to the
global top of the rest. Same total Hk*C; at 25% of 1,024 tokens the smallest head keeps 19 prefix
tokens where the official rule keeps 45 (``bench/kvpress_adakv_kept.py``, session 10).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .eviction_ref import colsum, pool1d, topk_mask


def pack_heads_reference(x: torch.Tensor) -> torch.Tensor:
    """[B, Hk, T, D] -> [B, 1, Hk*T, D], head-major (slot h*T + t holds head h's token t)."""
    return x.flatten(1, 2).unsqueeze(1)


def packed_positions_reference(pos: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, T] -> [B, Hk, Hk*T]: slot h'*T + t has pos[t] in head h' 's row and -1 in the others."""
    B, T = pos.shape
    eye = torch.eye(num_kv_heads, dtype=torch.bool, device=pos.device)[None, :, :, None]
    out = torch.where(eye, pos[:, None, None, :], torch.full_like(pos, -1)[:, None, None, :])
    return out.reshape(B, num_kv_heads, num_kv_heads * T)


def pyramid_budget(c_mean: int, n: int, window: int, layer: int, num_layers: int, beta: float) -> int:
    """PyramidKV's prefix budget C_l of ``layer`` for a prompt of n tokens (mean C over layers, ± L)."""
    if beta is None or beta <= 0 or num_layers <= 1:
        return c_mean
    k_min = int(c_mean / beta)
    k_max = 2 * c_mean - k_min
    if k_max >= n - window:
        k_max = n - window
        k_min = 2 * c_mean - k_max
    step = (k_max - k_min) // (num_layers - 1)
    return max(0, min(n - window, k_max - layer * step))


def adaptive_counts(scores: torch.Tensor, cand: torch.Tensor, c: int, floor: float) -> list[int]:
    """Ada-KV per-head counts for one row: scores, cand [Hk, S]; global top-(Hk*c), then the safeguard."""
    hk, S = scores.shape
    flat = scores.float().masked_fill(~cand, float("-inf")).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:hk * c]
    n = torch.bincount(order // S, minlength=hk).tolist()
    return [min(int(cand[h].sum()), math.floor((1.0 - floor) * n[h] + floor * c + 0.5)) for h in range(hk)]


SPLITS = ("official", "kvpress")


def kvpress_counts(scores: torch.Tensor, cand: torch.Tensor, c: int, floor: float, window: int) -> list[int]:
    """kvpress ``AdaKVPress``'s per-head counts for one row (prefix terms): scores, cand [Hk, S]; every head keeps
    c + window tokens on average; its top int(floor * (c + window)) (at least 1 when floor > 0) are forced, the
    window first, then the layer's Hk*c prefix slots left go to the global top of the rest (ties: lower flat index)."""
    hk, S = scores.shape
    n_safe = int((c + window) * floor)
    if floor > 0:
        n_safe = max(1, n_safe)
    forced_n = max(0, n_safe - window)
    s = scores.float().masked_fill(~cand, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :forced_n]
    forced = torch.zeros_like(cand).scatter_(-1, order, True) & cand
    rest = s.masked_fill(forced, float("-inf")).reshape(-1)
    left = max(0, min(hk * c, int(cand.sum())) - int(forced.sum()))
    top = torch.sort(rest, descending=True, stable=True).indices[:left]
    extra = torch.bincount(top // S, minlength=hk).tolist()
    return [min(int(cand[h].sum()), int(forced[h].sum()) + extra[h]) for h in range(hk)]


class SnapWindow(NamedTuple):
    """SnapKV's prefill scoring on the dense per-head layout, shared by every packed head-budget rule."""
    valid: torch.Tensor  # [B, Hk, S] slot holds a token
    n: torch.Tensor  # [B] prompt length of each row
    w: int  # observation window (clamped to T)
    start: torch.Tensor  # [B, 1, 1] first window position of each row
    prefix: torch.Tensor  # [B, Hk, S] candidates: valid and before the window
    pooled: torch.Tensor  # [B, Hk, S] pooled window attention over the prefix

    def keep_row(self, b: int, k_pos: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[Hk, S] bool: each head's top-``counts[h]`` prefix slots of row b, plus the row's window."""
        chosen = topk_mask(self.pooled[b:b + 1], self.prefix[b:b + 1], counts[None])
        return chosen[0] | (self.valid[b] & (k_pos[b] >= self.start[b]))

    def keep(self, budget_: int, k_pos: torch.Tensor, counts_of) -> torch.Tensor:
        """[B, Hk, S] bool: rows with at most ``budget_`` prompt tokens keep everything; any other row b keeps
        ``keep_row(b, k_pos, counts_of(b, n_b))``."""
        keep = self.valid.clone()
        for b in range(keep.shape[0]):
            nb = int(self.n[b])
            if nb > budget_:
                keep[b] = self.keep_row(b, k_pos, counts_of(b, nb))
        return keep


def snap_window(q, k, q_pos, k_pos, scale, window: int, kernel: int, pool: str) -> SnapWindow:
    """Score the prefix by the last ``window`` queries (fp32 colsum, GQA mean), pooled over positions."""
    T = q.shape[2]
    valid = k_pos >= 0
    n = (q_pos >= 0).sum(dim=1)
    w = min(window, T)
    obs = colsum(q, k, q_pos, k_pos, scale, None, rows=(T - w, T))
    start = (n - w)[:, None, None]
    prefix = valid & (k_pos < start)
    pooled = pool1d(obs.masked_fill(~prefix, 0.0), kernel, pool)
    return SnapWindow(valid, n, w, start, prefix, pooled)


def adakv_keep(q, k, q_pos, k_pos, scale, budget_: int, window: int, kernel: int, pool: str, adaptive: bool,
               floor: float, layer: int, num_layers: int, beta: float, split: str = "official") -> torch.Tensor:
    """[B, Hk, S] bool keep set on the dense per-head layout at prefill (k [B, Hk, S, D], k_pos [B, Hk, S])."""
    sw = snap_window(q, k, q_pos, k_pos, scale, window, kernel, pool)

    def counts_of(b, nb):
        c = pyramid_budget(budget_ - sw.w, nb, sw.w, layer, num_layers, beta)
        if adaptive and split == "kvpress":
            return torch.tensor(kvpress_counts(sw.pooled[b], sw.prefix[b], c, floor, sw.w), device=k.device)
        if adaptive:
            return torch.tensor(adaptive_counts(sw.pooled[b], sw.prefix[b], c, floor), device=k.device)
        return torch.full((k.shape[1],), c, device=k.device)

    return sw.keep(budget_, k_pos, counts_of)


def packed_fake(k, v, k_pos):
    """Fake (meta) outputs of a packed-cache eviction op: k, v [B, 1, n, D] and k_pos [B, Hk, n], n data-dependent."""
    n = torch.library.get_ctx().new_dynamic_size()
    B = k.shape[0]
    return k.new_empty(B, 1, n, k.shape[-1]), v.new_empty(B, 1, n, v.shape[-1]), k_pos.new_empty(B, k_pos.shape[1], n)


def compact_packed(keep_flat, k, v, k_pos, extras=()):
    """Gather a row's kept slots (keep_flat [B, N]) to the front of the packed buffers; pad with k_pos -1.

    ``extras``: per-slot state [B, 1, N] (e.g. a running score) gathered the same way (padding 0)."""
    keep_flat = keep_flat & (k_pos >= 0).any(dim=1)
    count = keep_flat.sum(dim=-1)
    n = int(count.max()) if keep_flat.numel() else 0
    order = torch.sort((~keep_flat).to(torch.uint8), dim=-1, stable=True).indices[:, :n]  # [B, n]
    valid = torch.arange(n, device=k.device) < count[:, None]
    idx = order[:, None, :, None].expand(-1, 1, n, k.shape[-1])
    kk = k.gather(2, idx).masked_fill(~valid[:, None, :, None], 0)
    vv = v.gather(2, order[:, None, :, None].expand(-1, 1, n, v.shape[-1])).masked_fill(~valid[:, None, :, None], 0)
    pos = k_pos.gather(2, order[:, None, :].expand(-1, k_pos.shape[1], n)).masked_fill(~valid[:, None, :], -1)
    if not extras:
        return kk, vv, pos
    return (kk, vv, pos, *[e.gather(2, order[:, None, :]).masked_fill(~valid[:, None, :], 0) for e in extras])


def unpack_prefill(x: torch.Tensor, k_pos: torch.Tensor, T: int):
    """Packed prefill slots -> dense: x [B, 1, Hk*T, D] -> [B, Hk, T, D]; k_pos -> [B, Hk, T] (head h's own slots)."""
    B, hk = k_pos.shape[:2]
    xd = x.reshape(B, hk, T, x.shape[-1])
    kp = torch.diagonal(k_pos.reshape(B, hk, hk, T), dim1=1, dim2=2).permute(0, 2, 1)
    return xd, kp


def adakv_reference(q, k, v, q_pos, k_pos, scale, budget_, window, kernel, pool, adaptive, floor, layer, num_layers,
                    beta, split="official"):
    """-> (k, v, k_pos) packed: compressed once after prefill (cache was empty), appended unchanged at decode.

    ``beta`` <= 0 means no pyramid (every layer gets budget - window prefix slots per head on average).
    """
    if split not in SPLITS:
        raise ValueError(f"evict_adakv: split={split!r}; allowed: {', '.join(SPLITS)}")
    T = q.shape[2]
    hk = k_pos.shape[1]
    if k.shape[2] != hk * T:  # decode, or a prompt over a non-empty cache: append only (SnapKV)
        return k, v, k_pos
    kd, kpd = unpack_prefill(k, k_pos, T)
    keep = adakv_keep(q, kd, q_pos, kpd, scale, budget_, window, kernel, pool, adaptive, floor, layer, num_layers, beta,
                      split)
    return compact_packed(keep.reshape(keep.shape[0], hk * T), k, v, k_pos)
