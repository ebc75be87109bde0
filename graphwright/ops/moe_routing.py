"""MoE routers with each model's own semantics: router logits [N, E] -> (weights [N, k], indices [N, k]).

A fused MoE must pick the same experts with the same weights, bit for bit, as the model it
replaces (ALGORITHMS.md section 4, fused-dispatch contract, point 1). So each function here
is a transcription of the transformers 5.x router, op for op and cast for cast; rewriting
them "equivalently" (e.g. topk on logits instead of probabilities, or a different division
order) can flip near-ties and move weights by an ulp. Tests call the HF router modules on
the same hidden states and assert exact equality.

Weights dtypes follow the models: Mixtral keeps fp32 weights (its experts multiply in fp32
and cast once per product); Qwen2-MoE casts them back to the logits dtype; PhiMoE's
sparsemixer softmax runs in the logits dtype (no fp32 upcast).
"""

from __future__ import annotations

import torch

ROUTERS = ("mixtral", "qwen2_moe", "sparsemixer")


def route_mixtral(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``MixtralTopKRouter``: softmax in fp32, top-k of the probabilities, renormalise (weights stay fp32)."""
    probs = torch.nn.functional.softmax(logits.float(), dim=-1)
    top_value, top_index = torch.topk(probs, top_k, dim=-1)
    top_value = top_value / top_value.sum(dim=-1, keepdim=True)  # HF divides in place: same bits
    return top_value, top_index


def route_qwen2_moe(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``Qwen2MoeTopKRouter``: softmax(dtype=fp32), top-k, renormalise only if ``norm_topk_prob``,
    then weights cast back to the logits dtype."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    top_value, top_index = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return top_value.to(logits.dtype), top_index


def _sparsemixer_mask(scores: torch.Tensor, masked_scores: torch.Tensor, jitter_eps: float):
    """Threshold mask of one sparsemixer round: (m - s_j) / max(|s_j|, m) > 2 eps.

    ``m`` is the max of ``masked_scores`` (the round's candidates) but the numerator and |.| use
    the ORIGINAL scores, as in HF. 0/0 (s_j = 0 = m) is NaN, which compares False: not masked.
    """
    threshold, max_ind = masked_scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    return ((threshold - scores) / factor) > (2 * jitter_eps), max_ind


def route_sparsemixer(logits: torch.Tensor, jitter_eps: float, top_k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE/GRIN ``sparsemixer`` (eval branch of transformers' ``phimoe.sparsemixer``).

    Round 1: i1 = argmax s; w1 = softmax(s masked by the threshold rule)[i1]. Round 2: the same
    on s with i1 set to -inf. No renormalisation, softmax in the logits dtype. Like HF it is
    top-2 whatever ``top_k`` says, so the pass only fuses blocks whose graph selects 2.
    """
    if top_k != 2:
        raise ValueError(f"sparsemixer routing is top-2 only (transformers' phimoe ignores top_k); got top_k={top_k}")
    scores = logits
    mask, selected = _sparsemixer_mask(scores, scores, jitter_eps)
    gates = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    w1 = gates.gather(dim=-1, index=selected)

    masked_scores = torch.scatter(scores, -1, selected, float("-inf"))
    mask2, selected2 = _sparsemixer_mask(scores, masked_scores, jitter_eps)
    gates2 = torch.softmax(masked_scores.masked_fill(mask2, float("-inf")), dim=-1)
    w2 = gates2.gather(dim=-1, index=selected2)
    return torch.concat((w1, w2), dim=-1), torch.concat((selected, selected2), dim=-1)


def route(router: str, logits: torch.Tensor, top_k: int, jitter_eps: float = 0.0,
          norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the router kind (one of ``ROUTERS``)."""
    if router == "mixtral":
        return route_mixtral(logits, top_k)
    if router == "qwen2_moe":
        return route_qwen2_moe(logits, top_k, norm_topk_prob)
    if router == "sparsemixer":
        return route_sparsemixer(logits, jitter_eps, top_k)
    raise ValueError(f"unknown MoE router {router!r}; known: {', '.join(ROUTERS)}")
