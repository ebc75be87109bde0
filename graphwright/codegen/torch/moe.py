"""Torch (CPU/any device) implementation of ``graphwright.fused_moe``: sort by expert, grouped GEMMs.

Dispatch (Tutel / vLLM fused_moe formulation, no capacity, no token dropped):

1. Route with the model's own router (``moe_routing``; bit-equal to transformers).
2. Flatten the N x k (token, slot) pairs slot-major (p = slot * N + token, the order
   transformers' ``one_hot(...).permute(2, 1, 0)`` visits them) and stable-sort by expert, so
   each expert's rows are one contiguous slice in the same order as the reference loop.
3. Gather the rows once into an expert-grouped buffer, each group padded with zero rows to a
   16-byte multiple, and run the grouped GEMMs *weight-stationary*: h^T = W_gate_up[e] @ X_e^T,
   act(gate) * up, y^T = W_down[e] @ h^T.
4. Multiply by the routing weight and cast to the hidden dtype once per product (as HF does),
   then one ``index_add_`` back in token order. ``index_add_`` adds the pairs sequentially in
   sorted (= ascending expert) order, which is the reference's per-token summation order too.

Why weight-stationary (measured on this 2-core CPU, torch 2.13, 2 threads, 30 layers of
SmolLM2-MoE expert weights so the weights stream from DRAM; d=576, I=1536, E=4, top-2):

    tokens   X @ W^T (transformers' orientation)   W @ X^T (this file)
    N=1      1.83 ms / layer                        1.82 ms
    N=8      5.85                                    4.01  (1.46x)
    N=512    35.0                                    34.0

With few rows per expert, X @ W^T is a skinny GEMM whose long dimension is the weight's
reduction axis, and the BLAS leaves most of the weight streaming to one core; W @ X^T makes the
weight's output rows the long (threaded) dimension. Zero-padding each group to a 16-byte multiple
is what ``torch._grouped_mm`` requires of the row strides, and keeps a one-token group off the
single-threaded GEMV path. ``torch._grouped_mm`` (one C++ call over all groups, empty groups
free) beats a Python loop over experts when E is large; when a shape or buffer breaks its
alignment rule (odd hidden sizes, memory-mapped weights), per-expert matmuls on the same column
slices compute the same thing. Results are allclose to the loop (fp32 1e-5), not bit-equal: the
GEMMs sum in another order, as transformers' own eager and grouped_mm paths do.
"""

from __future__ import annotations

import torch

from ...capture.ops import _act
from ...ops.fused_moe import router_logits
from ...ops.moe_routing import route


def _aligned(*tensors: torch.Tensor) -> bool:
    """``torch._grouped_mm``'s CPU/CUDA requirement: 16-byte aligned pointers and non-unit strides."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _grouped_linear_t(weight: torch.Tensor, x_t: torch.Tensor, offsets: torch.Tensor, counts: list) -> torch.Tensor:
    """``weight[e]`` [out, in] times the columns of ``x_t`` [in, P] grouped by expert: [out, P].

    Weight-stationary orientation (W @ X^T): the GEMM's long dimension is the expert's output
    features, so the BLAS threads split the weight rows, which is what a few-token decode needs
    (X @ W^T with M = 1..16 rows leaves one core streaming the weights). Columns past the last
    offset (alignment padding) are left undefined.
    """
    if hasattr(torch, "_grouped_mm") and x_t.dtype == weight.dtype and _aligned(weight, x_t):
        return torch._grouped_mm(weight, x_t, offs=offsets)
    out = x_t.new_empty((weight.shape[1], x_t.shape[1]))
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(weight[e], x_t[:, start:start + c], out=out[:, start:start + c])
            start += c
    return out


def _padded_groups(counts_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Columns per expert group, each non-empty group rounded up to a multiple of 16 bytes' worth.

    Every slice of a [*, P'] row-major buffer then starts 16-byte aligned (``_grouped_mm``'s
    rule), and a group never has a single column: one column makes the BLAS pick its
    single-threaded GEMV, several keep one-token decode on the multi-threaded GEMM.
    """
    per16 = max(2, 16 // torch.tensor([], dtype=dtype).element_size())
    return (counts_t + per16 - 1) // per16 * per16


SKINNY_MAX_ROWS = 2  # tokens per expert at or below which decode streams weights through split bmm
SPLIT = 4  # weight row chunks: one bmm batch entry each, so the BLAS runs them on parallel threads


def _split_matmul(weight: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] @ ``x_t`` [in, c] for a few columns, streamed by several threads.

    A GEMM with one or two columns is a GEMV to the BLAS, which streams the whole weight from one
    core (~11 GB/s here). Viewing the weight as ``SPLIT`` row chunks and running one batched GEMM
    over them gives each thread its own chunk (~29 GB/s for one column on this 2-core CPU).
    """
    out_f, in_f = weight.shape
    if out_f % SPLIT:
        return weight @ x_t
    return torch.bmm(weight.view(SPLIT, out_f // SPLIT, in_f), x_t.expand(SPLIT, *x_t.shape)).view(out_f, x_t.shape[1])


def _skinny_experts(x: torch.Tensor, counts: list, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                    act: str) -> torch.Tensor:
    """Rows ``x`` [P, d] grouped by expert (``counts`` each, all small), through their experts: [P, d].

    Decode path: every hit expert's weights are read once (the cost at this size), by split
    GEMMs; experts without tokens are never touched.
    """
    inter = down_proj.shape[2]
    y = torch.empty_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c:
            gate_up_t = _split_matmul(gate_up_proj[e], x[start:start + c].t())  # [2I, c]
            h_t = _act(act, gate_up_t[:inter]) * gate_up_t[inter:]
            y[start:start + c] = _split_matmul(down_proj[e], h_t).t()
            start += c
    return y


def moe_experts_sorted(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act: str) -> torch.Tensor:
    """Same contract as ``moe_experts_reference`` (transformers' loop), computed expert-sorted."""
    N, k = top_k_index.shape
    out = torch.zeros_like(hidden)
    if N == 0:
        return out
    E = gate_up_proj.shape[0]
    inter = down_proj.shape[2]
    flat = top_k_index.t().reshape(-1)  # slot-major pair ids p = slot * N + token
    expert_sorted, order = torch.sort(flat, stable=True)
    token = order % N
    slot = order // N
    counts_t = torch.bincount(expert_sorted, minlength=E)
    if int(counts_t.max()) <= SKINNY_MAX_ROWS:  # decode: weight streaming dominates
        y = _skinny_experts(hidden.index_select(0, token), counts_t.tolist(), gate_up_proj, down_proj, act)
        return _combine(out, y, token, slot, top_k_weights)
    # column of each sorted pair in the padded, expert-grouped layout (zero columns fill the padding)
    padded = _padded_groups(counts_t, hidden.dtype)
    offsets = torch.cumsum(padded, 0, dtype=torch.int32)
    rank = torch.arange(N * k, device=hidden.device) - (torch.cumsum(counts_t, 0) - counts_t)[expert_sorted]
    col = (offsets - padded)[expert_sorted] + rank
    counts = padded.tolist()  # one host sync (free on CPU); sizes the buffer and the fallback loop

    x = hidden.new_zeros((sum(counts), hidden.shape[1]))
    x.index_copy_(0, col, hidden.index_select(0, token))  # [P', d] grouped by expert
    gate_up_t = _grouped_linear_t(gate_up_proj, x.t(), offsets, counts)  # [2I, P']: gate rows first, then up
    h_t = _act(act, gate_up_t[:inter]) * gate_up_t[inter:]  # [I, P'] row-major
    y_t = _grouped_linear_t(down_proj, h_t, offsets, counts)  # [d, P']
    y = y_t.t().index_select(0, col)  # [P, d] in sorted-pair order, contiguous
    return _combine(out, y, token, slot, top_k_weights)


def _combine(out, y, token, slot, top_k_weights):
    """Weighted sum of the sorted pairs' outputs ``y`` [P, d] back into ``out`` in token order."""
    # HF: (y * w[t, slot]) in the promoted dtype (fp32 weights for Mixtral), cast once per product
    y = y * top_k_weights[token, slot, None]
    out.index_add_(0, token, y.to(out.dtype))
    return out


def fused_moe_sorted(hidden, router_weight, router_bias, gate_up_proj, down_proj, router: str, top_k: int,
                     act: str, jitter_eps: float, norm_topk_prob: bool):
    """``graphwright.fused_moe`` for the torch backend: exact routing, then the expert-sorted experts."""
    logits = router_logits(hidden, router_weight, router_bias)
    weights, index = route(router, logits, top_k, jitter_eps, norm_topk_prob)
    return moe_experts_sorted(hidden, index, weights, gate_up_proj, down_proj, act), logits


def fused_moe_triton(hidden, router_weight, router_bias, gate_up_proj, down_proj, router: str, top_k: int,
                     act: str, jitter_eps: float, norm_topk_prob: bool):
    """``fuse_moe(impl="triton")``: the Triton grouped-GEMM kernels (imported lazily: triton is heavy)."""
    from ..triton.moe import fused_moe_triton as kernel

    return kernel(hidden, router_weight, router_bias, gate_up_proj, down_proj, router, top_k, act, jitter_eps,
                  norm_topk_prob)


def fused_moe_auto(hidden, router_weight, router_bias, gate_up_proj, down_proj, router: str, top_k: int,
                   act: str, jitter_eps: float, norm_topk_prob: bool):
    """``fuse_moe(impl="auto")``: Triton kernels on a GPU when Triton is importable, else the sorted torch path."""
    fn = fused_moe_triton if hidden.is_cuda and _triton_available() else fused_moe_sorted
    return fn(hidden, router_weight, router_bias, gate_up_proj, down_proj, router, top_k, act, jitter_eps,
              norm_topk_prob)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
