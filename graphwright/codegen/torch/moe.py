"""Torch (CPU/any device) implementation of ``graphwright.fused_moe``: sort by expert, grouped GEMMs.

Dispatch (Tutel / vLLM fused_moe formulation, no capacity, no token dropped):

1. Route with the model's own router (``moe_routing``; bit-equal to transformers).
2. Flatten the N x k (token, slot) pairs slot-major (p = slot * N + token, the order
   transformers' ``one_hot(...).permute(2, 1, 0)`` visits them) and stable-sort by expert, so
   each expert's rows are one contiguous slice in the same order as the reference loop.
3. Gather the rows once, grouped by expert, and run the experts by the regime the size puts
   them in (all three read each hit expert's weights once and never touch an empty expert):

   * one token per hit expert (decode at batch 1): per expert, gate/up and down as split
     matrix-vector products (``_split_matvec``: the weight viewed as 4 row chunks, one bmm);
   * fewer than ``ROW_MAJOR_MIN_PAIRS`` (token, expert) pairs: weight-stationary grouped GEMMs,
     h^T = W_gate_up[e] @ X_e^T, act(gate) * up, y^T = W_down[e] @ h^T, each group zero-padded
     to a 16-byte multiple of columns (``torch._grouped_mm``'s alignment rule);
   * more (prefill): transformers' orientation X_e @ W[e]^T as one grouped GEMM per projection.
4. Multiply by the routing weight and cast to the hidden dtype once per product (as HF does),
   then one ``index_add_`` back in token order. ``index_add_`` adds the pairs sequentially in
   sorted (= ascending expert) order, which is the reference's per-token summation order too.

Why three regimes (``python bench/bench_moe_regimes.py``: 2-core CPU, torch 2.13 + MKL, 2
threads, 30 layers of SmolLM2-MoE-sized expert weights so they stream from DRAM; d=576, I=1536,
E=4, top-2; ms per layer, best of 5, two runs; a forced regime does not apply at one token):

    tokens   row-major X @ W^T   weight-stationary W @ X^T   default
    N=1      (one token per expert: split matvecs)           0.78-0.80  (HF loop: 1.70, bench_fuse_moe)
    N=8      6.0                 3.0-3.2                     3.0-3.1
    N=64     7.5-7.6             7.8-8.0                     7.7-8.4
    N=512    34-40               36.5-38.6                   35-36

At decode the cost is streaming the hit experts' weights (~10.6 MB each here). MKL runs a
one-column product as a single-threaded GEMV (~11 GB/s); splitting the weight into row chunks
of one batched GEMM uses both cores (~25-29 GB/s). With a few columns, X @ W^T is a skinny GEMM
whose long dimension is the reduction axis, and W @ X^T with the right-hand side laid out
transposed (strides (1, rows)) is MKL's fast layout for it (a contiguous [in, c] operand picks a
kernel up to 4x slower). The bandwidths and the layout effect come from one-off timings of a
single 3072 x 576 / 576 x 1536 fp32 product over 40-60 DRAM-resident copies (not kept as a
benchmark; the table above is). From tens of tokens per expert both orientations are equal
within run-to-run noise (~10%), and from ~256 tokens the GEMMs are compute-bound: every
orientation does the same FLOPs, so prefill keeps transformers' orientation.
``torch._grouped_mm`` (one C++ call over all groups, empty groups free) beats a Python loop over
experts when E is large; when a shape or buffer breaks its alignment rule (odd hidden sizes,
memory-mapped weights), per-expert matmuls on the same slices compute the same thing. Results
are allclose to the loop (fp32 1e-5), not bit-equal: the GEMMs sum in another order, as
transformers' own eager and grouped_mm paths do.
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


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, counts: list) -> torch.Tensor:
    """One GEMM per expert group: ``torch._grouped_mm`` when its alignment rule holds, else a loop.

    Two layouts (the groups are ``counts`` consecutive rows / columns ending at ``offsets``):

    * 2D x 3D, transformers' orientation: rows of ``a`` [P, in] times ``b[e]`` [in, out] -> [P, out];
    * 3D x 2D, weight-stationary: ``a[e]`` [out, in] times columns of ``b`` [in, P] -> [out, P]
      (columns past the last offset, alignment padding, are left undefined).
    """
    if hasattr(torch, "_grouped_mm") and a.dtype == b.dtype and _aligned(a, b):
        return torch._grouped_mm(a, b, offs=offsets)
    by_rows = a.dim() == 2
    out = a.new_empty((a.shape[0], b.shape[2]) if by_rows else (a.shape[1], b.shape[1]))
    start = 0
    for e, c in enumerate(counts):
        if c:
            g = slice(start, start + c)
            if by_rows:
                torch.mm(a[g], b[e], out=out[g])
            else:
                torch.mm(a[e], b[:, g], out=out[:, g])
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


ROW_MAJOR_MIN_PAIRS = 512  # (token, expert) pairs from which the GEMMs are compute-bound (measured)
SPLIT = 4  # weight row chunks: one bmm batch entry each, so the BLAS runs them on parallel threads


def _split_matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] @ ``x`` [in] -> [out], streamed by several threads.

    A one-column product is a GEMV to the BLAS, which streams the whole weight from one core
    (~11 GB/s on this 2-core CPU). Viewing the weight as ``SPLIT`` row chunks and running one
    batched GEMM over them gives each thread its own chunk (~25-29 GB/s). The vector goes in as a
    [1, in] row seen transposed (strides (1, in)): given as a contiguous [in, 1] column instead,
    MKL picks a kernel that is 4x slower (measured).
    """
    out_f, in_f = weight.shape
    row = x.reshape(1, in_f)
    if row.stride(1) != 1 or row.stride(0) != in_f:
        row = torch.empty((1, in_f), dtype=x.dtype, device=x.device).copy_(row)
    if out_f % SPLIT:
        return (weight @ row.t()).view(out_f)
    return torch.bmm(weight.view(SPLIT, out_f // SPLIT, in_f), row.t().expand(SPLIT, in_f, 1)).view(out_f)


def _single_token_experts(x: torch.Tensor, experts: list, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                          act: str) -> torch.Tensor:
    """Decode with one token per hit expert: row i of ``x`` [P, d] through expert ``experts[i]``.

    The cost is reading each hit expert's weights once; experts without tokens are never touched.
    """
    inter = down_proj.shape[2]
    y = torch.empty_like(x)
    for i, e in enumerate(experts):
        gate_up = _split_matvec(gate_up_proj[e], x[i])  # [2I]
        h = _act(act, gate_up[:inter]) * gate_up[inter:]
        y[i] = _split_matvec(down_proj[e], h)
    return y


def moe_experts_sorted(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act: str) -> torch.Tensor:
    """Same contract as ``moe_experts_reference`` (transformers' loop), computed expert-sorted."""
    N, k = top_k_index.shape
    out = torch.zeros_like(hidden)
    if N == 0:
        return out
    E = gate_up_proj.shape[0]
    flat = top_k_index.t().reshape(-1)  # slot-major pair ids p = slot * N + token
    expert_sorted, order = torch.sort(flat, stable=True)
    token = order % N
    slot = order // N
    counts_t = torch.bincount(expert_sorted, minlength=E)
    x = hidden.index_select(0, token)  # [P, d] grouped by expert
    if int(counts_t.max()) == 1:  # decode, one token per hit expert: weight streaming dominates
        y = _single_token_experts(x, expert_sorted.tolist(), gate_up_proj, down_proj, act)
    elif N * k < ROW_MAJOR_MIN_PAIRS:  # few tokens per expert: still bound by reading the weights
        y = _weight_stationary_experts(x, counts_t, expert_sorted, gate_up_proj, down_proj, act)
    else:  # compute-bound: transformers' orientation, one grouped GEMM per projection
        y = _row_major_experts(x, counts_t, gate_up_proj, down_proj, act)
    return _combine(out, y, token, slot, top_k_weights)


def _weight_stationary_experts(x, counts_t, expert_sorted, gate_up_proj, down_proj, act) -> torch.Tensor:
    """W @ X^T grouped GEMMs over expert groups zero-padded to 16-byte multiples: [P, d]."""
    P = x.shape[0]
    inter = down_proj.shape[2]
    padded = _padded_groups(counts_t, x.dtype)
    offsets = torch.cumsum(padded, 0, dtype=torch.int32)
    rank = torch.arange(P, device=x.device) - (torch.cumsum(counts_t, 0) - counts_t)[expert_sorted]
    col = (offsets - padded)[expert_sorted] + rank  # column of each sorted pair in the padded layout
    counts = padded.tolist()  # one host sync (free on CPU); sizes the buffer and the fallback loop
    xp = x.new_zeros((sum(counts), x.shape[1])).index_copy_(0, col, x)  # [P', d]
    # W @ X^T: the GEMM's long dimension is the weight's output rows, which the BLAS threads split
    gate_up_t = _grouped_mm(gate_up_proj, xp.t(), offsets, counts)  # [2I, P']: gate rows first, then up
    # the right-hand operand goes in seen transposed (strides (1, rows)): MKL's fast layout for skinny GEMMs
    h_t = (_act(act, gate_up_t[:inter]) * gate_up_t[inter:]).t().contiguous().t()  # [I, P']
    y_t = _grouped_mm(down_proj, h_t, offsets, counts)  # [d, P']
    return y_t.t().index_select(0, col)  # [P, d] in sorted-pair order, contiguous


def _row_major_experts(x, counts_t, gate_up_proj, down_proj, act) -> torch.Tensor:
    """X @ W^T grouped GEMMs (transformers' orientation) over contiguous expert groups: [P, d]."""
    inter = down_proj.shape[2]
    offsets = torch.cumsum(counts_t, 0, dtype=torch.int32)
    counts = counts_t.tolist()
    # [E, in, out] views, no copy: grouped_mm reads them strided
    gate_up = _grouped_mm(x, gate_up_proj.transpose(1, 2), offsets, counts)  # [P, 2I]
    h = _act(act, gate_up[:, :inter]) * gate_up[:, inter:]
    return _grouped_mm(h, down_proj.transpose(1, 2), offsets, counts)


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
