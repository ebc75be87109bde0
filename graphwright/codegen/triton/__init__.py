"""Triton backend: graphwright ops lowered to Triton kernels (``compile(..., backend="triton")``).

The kernel modules import ``triton`` and are decorated at import time, which is when Triton reads
``TRITON_INTERPRET``; so this package only holds thin wrappers that import the kernels on first
call. Importing graphwright therefore never imports Triton, and CPU tests can switch the
interpreter on in their conftest.

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from __future__ import annotations

import os


def _check_device(t) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' needs CUDA tensors (got a {t.device.type} tensor); on CPU use "
                           "backend='torch', or set TRITON_INTERPRET=1 before graphwright runs a kernel (tests only)")


def attention_triton(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, sinks=0):
    _check_device(q)
    from .attention_dispatch import attention_triton as impl

    return impl(q, k, v, q_pos, k_pos, scale, window, key_bias, sinks)


def latent_attention_triton(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, rope_scaling, scale,
                            window=0, key_bias=None, sinks=0, k_norm=None, k_norm_eps=1e-6):
    _check_device(q)
    from .latent_attention import latent_attention_triton as impl

    return impl(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, rope_scaling, scale, window,
                key_bias, sinks, k_norm, k_norm_eps)


def block_sparse_triton(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill=False, page_a=None, page_b=None):
    _check_device(q)
    from .block_sparse import block_sparse_triton as impl

    return impl(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill, page_a, page_b)


def moe_experts_triton(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act):
    _check_device(hidden)
    from .moe import moe_experts_triton as impl

    return impl(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act)


def fused_moe_triton(hidden, router_weight, router_bias, gate_up_proj, down_proj, router, top_k, act, jitter_eps,
                     norm_topk_prob):
    _check_device(hidden)
    from .moe import fused_moe_triton as impl

    return impl(hidden, router_weight, router_bias, gate_up_proj, down_proj, router, top_k, act, jitter_eps,
                norm_topk_prob)


def _overrides() -> dict:
    """Op -> Triton implementation; ``lower`` layers these over the torch backend's table."""
    from ...capture.ops import ATTENTION, MOE_EXPERTS
    from ...ops.block_sparse import BLOCK_SPARSE_ATTENTION
    from ...ops.fused_moe import FUSED_MOE
    from ...ops.latent_attention import LATENT_ATTENTION
    from ..torch.moe import fused_moe_sorted

    # fuse_moe(impl="sorted") is an explicit request for the torch path: honoured on every backend
    fused = {"auto": fused_moe_triton, "triton": fused_moe_triton, "sorted": fused_moe_sorted}
    return {ATTENTION: attention_triton, LATENT_ATTENTION: latent_attention_triton,
            BLOCK_SPARSE_ATTENTION: block_sparse_triton, MOE_EXPERTS: moe_experts_triton, FUSED_MOE: fused}


TRITON_OVERRIDES = _overrides()
