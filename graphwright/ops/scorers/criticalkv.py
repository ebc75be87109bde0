"""CriticalKV (arXiv 2502.03805, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective"): SnapKV's window attention re-weighted by how much each value can move the layer's output.

The paper bounds the output perturbation of evicting token j by its attention times the norm of its
value projected through the output projection, ||v_j W_O,h||_1, and selects in two stages so that
the attention-only choice is kept for part of the budget:

1. stage 1: the first ``first`` share of the head's budget (sinks and window included, as kvpress
   counts its window, scored highest, among them) goes to the top tokens by the base score alone;
   that is m = floor(first * budget) - protected evictable tokens, ties to the earliest slot;
2. stage 2: every other evictable token scores (a_j + eps) * mean over the g query heads h of the
   KV head of ||v_j W_O,h^T||_1 (W_O,h: the columns of ``o_proj.weight`` [hidden, H*D] of head h),
   and the rest of the budget goes to the top of those.

The base score a_j is SnapKV's (``snapkv.py``: window 32, kernel 5 by default) divided by the window
length, i.e. the mean over the window rows (the scale kvpress's SnapKV gives; it matters because
``eps`` is added before the product). kvpress ``CriticalKVPress(SnapKVPress)``, its default pairing,
is this rule with first 0.5 and eps 1e-4 (the defaults here).
With ``rule='adaptive'`` (Ada-KV head budgets, kvpress ``CriticalAdaKVPress``) the selection is
``ops/adakv_critical.py``'s, on the packed cache. Exact setting: budget >= prompt length (nothing is evicted).
Prefill only (SnapKV's window). On latent (``lowrank_kv``, value_path='absorbed') layers the values are the
shared latent rows c_v and ``wo`` the absorbed o_proj (W_O'_h = W_O,h B_V,h^T), so ||c_v W_O'_h^T||_1 is exactly
the norm of the rebuilt value through the original projection (``output_values``; a value bias, folded into
o_proj's bias, would be missing: the pass refuses latent layers with one), and the layer keeps the union of its
heads' sets.
Invariants tested (``tests/ops/test_scorer_criticalkv.py``): kept sets equal a loop oracle on random
attention and values; ``first=1`` keeps SnapKV's sets; the exact setting is the identity on tiny models; on a
latent payload the score equals that of explicitly decompressed values (``tests/ops/test_scorer_latent_values.py``).
"""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer
from .snapkv import snapkv_score


def value_output_norm(v: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S] fp32: mean over a KV head's g query heads h of ||v_j W_O,h^T||_1 (``wo`` [hidden, H*D])."""
    B, Hk, S, D = v.shape
    H = wo.shape[1] // D
    w = wo.float().reshape(wo.shape[0], H, D)  # [hidden, H, D]
    g = H // Hk
    out = torch.zeros(B, Hk, S, dtype=torch.float32, device=v.device)
    for h in range(H):  # one query head at a time: [B, S, hidden] at most
        out[:, h // g] += (v[:, h // g].float() @ w[:, h].T).abs().sum(-1)
    return out / g


def output_values(x: ScoreInputs) -> torch.Tensor:
    """The values ``wo`` multiplies: ``x.v``, or on a latent layer (``lowrank_kv``, value_path='absorbed': ``v`` the
    shared payload [B, 1, S, r_k + r_v], ``wo`` the absorbed o_proj [hidden, H*r_v] with W_O'_h = W_O,h B_V,h^T)
    the payload's last r_v = width / H columns c_v for every KV head: c_v W_O'_h^T = (c_v B_V,h) W_O,h^T, the
    norm of the rebuilt value through the original projection."""
    H, Hk = x.q.shape[1], x.k.shape[1]
    if x.v.shape[-1] * H == x.wo.shape[1]:
        return x.v
    r_v = x.wo.shape[1] // H
    return x.v[..., -r_v:].expand(-1, Hk, -1, -1)


def critical_rescale(base: torch.Tensor, x: ScoreInputs) -> torch.Tensor:
    """The two stages over any base score [B, Hk, S]: stage-1 tokens get the largest fp32 value, the others
    (base + eps) * ||v W_O||_1; ``x.cap`` [B, Hk] the per-head budget, ``x.cand`` the evictable slots."""
    if x.wo is None or x.cap is None:
        raise ValueError("criticalkv: needs the layer's o_proj weight (wo) and the head budgets (cap)")
    protected = ((x.k_pos >= 0) & ~x.cand).sum(-1)
    m = (torch.floor(x.first * x.cap.double()).long() - protected).clamp(min=0)  # [B, Hk]
    masked = base.float().masked_fill(~x.cand, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    stage1 = x.cand & (rank < m[..., None])
    second = (base.float() + x.eps) * value_output_norm(output_values(x), x.wo)
    return torch.where(stage1, torch.finfo(torch.float32).max, second)


def criticalkv_score(x: ScoreInputs) -> torch.Tensor:
    T = x.q.shape[2]
    w = min(max(x.window, 1), T)
    return critical_rescale(snapkv_score(x) / w, x)


CRITICALKV = Scorer("criticalkv", criticalkv_score, "arXiv 2502.03805",
                    "SnapKV mean window attention, two stages: top first*budget by attention, the rest by "
                    "(a + eps) * ||v W_O||_1", "budget >= prompt length", prefill_only=True, gqa_pool=True,
                    smoothing=True, needs_wo=True)
