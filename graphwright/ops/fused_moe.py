"""``graphwright.fused_moe``: one MoE block's router + routed experts as a single op.

Written by the ``fuse_moe`` pass in place of the router's ATen nodes (linear, softmax, topk,
...) and the ``graphwright.moe_experts`` node, so a backend can route, sort by expert and run
grouped GEMMs in one place (Tutel / vLLM fused_moe style) instead of the per-expert loop.

Signature::

    fused_moe(hidden [N, d], router_weight [E, d], router_bias [E] | None,
              gate_up_proj [E, 2I, d], down_proj [E, d, I],
              router: str, top_k: int, act: str, jitter_eps: float, norm_topk_prob: bool)
        -> (out [N, d] in hidden's dtype, router_logits [N, E] in the linear's dtype)

Semantics (the reference below defines them): logits = linear(hidden, router_weight,
router_bias) in the model dtype; (weights, indices) = the model's own router
(``moe_routing.route``); out = ``moe_experts_reference`` (transformers' loop: per product
``(FFN_e(x) * w).to(hidden dtype)``, ``index_add_`` into zeros, no token dropped). Shared
experts (Qwen2-MoE) are not part of the op; they stay ordinary graph nodes.
"""

from __future__ import annotations

import torch

from ..capture.ops import SUPPORTED_MOE_ACTIVATIONS, moe_experts_reference
from .moe_routing import ROUTERS, route


def router_logits(hidden: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None) -> torch.Tensor:
    """[N, E] router logits exactly as the model's gate computes them (``F.linear`` in the model dtype)."""
    return torch.nn.functional.linear(hidden, router_weight, router_bias)


def check_fused_moe_args(hidden, router_weight, gate_up_proj, down_proj, router, top_k, act):
    if hidden.dim() != 2:
        raise ValueError(f"fused_moe wants hidden [N, d]; got {tuple(hidden.shape)}")
    E, d = router_weight.shape
    if hidden.shape[1] != d or gate_up_proj.shape[0] != E or down_proj.shape[0] != E \
            or gate_up_proj.shape[2] != d or down_proj.shape[1] != d or gate_up_proj.shape[1] != 2 * down_proj.shape[2]:
        raise ValueError(f"fused_moe shapes disagree: hidden {tuple(hidden.shape)}, router {tuple(router_weight.shape)}, "
                         f"gate_up_proj {tuple(gate_up_proj.shape)} (want [E, 2I, d]), down_proj {tuple(down_proj.shape)} (want [E, d, I])")
    if router not in ROUTERS:
        raise ValueError(f"unknown MoE router {router!r}; known: {', '.join(ROUTERS)}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}]; got {top_k}")
    if act not in SUPPORTED_MOE_ACTIVATIONS:
        raise ValueError(f"unsupported MoE activation {act!r}; supported: {SUPPORTED_MOE_ACTIVATIONS}")


def fused_moe_reference(hidden, router_weight, router_bias, gate_up_proj, down_proj, router: str, top_k: int,
                        act: str, jitter_eps: float, norm_topk_prob: bool):
    """Route with the model's own router, then transformers' experts loop. Returns (out, logits)."""
    logits = router_logits(hidden, router_weight, router_bias)
    weights, index = route(router, logits, top_k, jitter_eps, norm_topk_prob)
    out = moe_experts_reference(hidden, index, weights, gate_up_proj, down_proj, act)
    return out, logits


@torch.library.custom_op("graphwright::fused_moe", mutates_args=())
def fused_moe(hidden: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None,
              gate_up_proj: torch.Tensor, down_proj: torch.Tensor, router: str, top_k: int, act: str,
              jitter_eps: float, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE block (router + routed experts); the torch implementation is the reference."""
    check_fused_moe_args(hidden, router_weight, gate_up_proj, down_proj, router, top_k, act)
    return fused_moe_reference(hidden, router_weight, router_bias, gate_up_proj, down_proj, router, top_k, act,
                               jitter_eps, norm_topk_prob)


@fused_moe.register_fake
def _fused_moe_fake(hidden, router_weight, router_bias, gate_up_proj, down_proj, router, top_k, act, jitter_eps,
                    norm_topk_prob):
    logits_dtype = torch.promote_types(hidden.dtype, router_weight.dtype)
    return torch.empty_like(hidden), hidden.new_empty((hidden.shape[0], router_weight.shape[0]), dtype=logits_dtype)


FUSED_MOE = torch.ops.graphwright.fused_moe.default
