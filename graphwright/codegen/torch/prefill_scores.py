"""H2O's prompt scores without the invisible half: column sums of attention over the causal key range only.

At a prompt step H2O scores every key by the attention it received from every prompt query
(``eviction_ref.colsum``: blocks of ``ROW_CHUNK`` query rows, each a [g, rows, S] fp32 score,
mask, softmax and column sum over *all* S keys). In a prompt from an empty cache every key after
a block's last query is masked for the whole block, so its probabilities are exact zeros: computing
them is half the work of the whole prompt's scoring. ``prompt_colsum`` gives each block of rows
t0..t1 the keys 0..t1 only.

Exact setting: this is the same arithmetic, not an approximation. A block's keys are cut at
``t1``, a multiple of ``ROW_CHUNK`` (256) except for the last block, which keeps all S keys, so every
kept element sits in the same lane of the vectorised max / exp / sum as in the reference's full
row (the dropped tail only added exact zeros), and the matmul computes each dot product alone. The
result equals ``eviction_ref.colsum`` bit for bit (tested on random prompts, left-padded rows,
several lengths and grouped heads; H2O's kept sets after prefill compared with the reference's in
the model: ``tests/codegen/test_prefill_scores.py``).

When it applies (checked once per layer, one host read): S == T, every head's key positions equal
the query positions (the keys are this prompt's tokens) and the real positions increase along the
row (left padding only). Otherwise the reference runs.
"""

from __future__ import annotations

import torch

from ...capture.ops import visible_mask
from ...ops.eviction_ref import ROW_CHUNK, colsum, h2o_accumulate_evict


def causal_prompt(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """The keys are the prompt's queries in position order: a key after query i is invisible to it."""
    B, T = q_pos.shape
    if k_pos.dim() != 3 or k_pos.shape[2] != T or T < 2:
        return False
    later = q_pos[:, 1:]
    increasing = (later < 0) | (later > q_pos.cummax(dim=1).values[:, :-1])  # a real position above all before it
    return bool((k_pos == q_pos[:, None, :]).all() & increasing.all())


def prompt_colsum(q, k, q_pos, k_pos, scale, key_bias=None) -> torch.Tensor:
    """``eviction_ref.colsum`` (all query rows) of a prompt step, each block of rows over its causal key range."""
    if not causal_prompt(q_pos, k_pos):
        return colsum(q, k, q_pos, k_pos, scale, key_bias)
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    out = torch.zeros(B, Hk, S, dtype=torch.float32, device=q.device)
    kf = k.float().transpose(-1, -2)
    padded = bool((q_pos < 0).any())
    neg = torch.finfo(torch.float32).min
    for t0 in range(0, T, ROW_CHUNK):
        t1 = min(t0 + ROW_CHUNK, T)
        n = S if t1 == T else t1  # keys 0..n-1: every key a row of this block can see
        qc = q[:, :, t0:t1].float().reshape(B, Hk, g, t1 - t0, D)
        s = torch.matmul(qc, kf[:, :, None, :, :n]).mul_(scale)  # [B, Hk, g, t, n]
        if key_bias is not None:
            s = s + key_bias.float().view(B, Hk, g, 1, S)[..., :n]
        qp = q_pos[:, t0:t1]
        if padded:  # the reference's mask and padding rows zeroed
            s = s.masked_fill(~visible_mask(qp, k_pos[..., :n]), neg)
            p = torch.softmax(s, dim=-1) * (qp >= 0)[:, None, None, :, None]
        else:  # no padding: keys before t0 are visible to the whole block, the t x t tile is causal
            s[..., t0:n].masked_fill_(_after(t1 - t0, q.device), neg)  # the same places the reference masks
            p = torch.softmax(s, dim=-1)  # every row is real (the reference multiplies by 1)
        out[..., :n] += p.sum(dim=3).mean(dim=2)
    return out


_TILES: dict = {}


def _after(t: int, device) -> torch.Tensor:
    """[t, t] bool: key b after query a (b > a) inside one block's diagonal tile."""
    key = str(device)
    tile = _TILES.get(key)
    if tile is None:
        with torch.inference_mode(False):  # a plain tensor: made under inference_mode it could not be saved for backward later
            tile = _TILES[key] = torch.ones(ROW_CHUNK, ROW_CHUNK, dtype=torch.bool, device=device).triu(1)
    return tile[:t, :t]


def h2o_prompt(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """``eviction_ref.h2o_reference`` with its column sums from ``prompt_colsum`` (same values). -> (k, v, k_pos, score)."""
    return h2o_accumulate_evict(prompt_colsum(q, k, q_pos, k_pos, scale, key_bias), k, v, q_pos, k_pos, score,
                                heavy_n, heavy_f, recent_n, recent_f)
