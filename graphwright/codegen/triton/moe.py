"""Fused MoE experts as two Triton grouped GEMMs over the expert-sorted (token, slot) pairs.

Based on vLLM's ``fused_moe`` Triton kernel and MegaBlocks (arXiv:2211.15841): no capacity, no
token dropped, no padded copy of the activations.

* Routing is the model's own (``ops.moe_routing.route``, bit-equal to transformers); the N x k
  pairs are flattened slot-major and stable-sorted by expert exactly as the torch backend does
  (``codegen/torch/moe.py``), so each expert owns one contiguous slice of pair rows.
* Tiles: each expert's slice is cut into BLOCK_M-row tiles; a tile table (expert, first row,
  end row) is built with tensor ops on the device, sized by the upper bound cdiv(P, BLOCK_M) + E
  so no host sync is needed; surplus tiles exit at once.
* ``_gate_up_kernel``: rows gathered straight from ``hidden`` by token id (no [P, d] copy), one
  fp32 accumulator each for the gate and up halves of ``gate_up_proj[e]`` [2I, d], then
  act(gate) * up fused in registers -> h [P, I] in the hidden dtype.
* ``_down_kernel``: h @ down_proj[e]^T, times the pair's routing weight (fp32, as Mixtral's
  weights are), cast to the hidden dtype once per product (transformers' order) -> y [P, d]; the
  weighted rows are summed back in token order with one ``index_add_`` (deterministic and in the
  reference's ascending-expert order; atomics would make the sum order run-dependent).

Shapes: hidden [N, d], top_k_index / top_k_weights [N, k], gate_up_proj [E, 2I, d] (gate rows
first), down_proj [E, d, I] -> [N, d] in hidden's dtype. Semantics: ``moe_experts_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.fused_moe import router_logits
from ...ops.moe_routing import route

ACTS = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "relu": 3}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:  # tanh(u) = 2 sigmoid(2u) - 1 (tanh is not a portable tl builtin)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _gate_up_kernel(X, TOKEN, TILE_E, TILE_START, TILE_END, W, H, d, inter,
                    sxn, sxd, swe, swn, swd, shp, shi,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    e = tl.load(TILE_E + tile).to(tl.int64)
    if e >= 0:
        start = tl.load(TILE_START + tile)
        end = tl.load(TILE_END + tile)
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < end
        tok = tl.load(TOKEN + rows, mask=row_ok, other=0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < inter
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = offs_k < d
            x = tl.load(X + tok[:, None] * sxn + offs_k[None, :] * sxd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ptr = W + e * swe + offs_k[:, None] * swd
            wmask = k_ok[:, None] & n_ok[None, :]
            wg = tl.load(w_ptr + offs_n[None, :] * swn, mask=wmask, other=0.0)  # gate rows [0, I)
            wu = tl.load(w_ptr + (offs_n[None, :] + inter) * swn, mask=wmask, other=0.0)  # up rows [I, 2I)
            acc_g = tl.dot(x, wg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(x, wu, acc_u, input_precision=DOT_PREC)
        h = _act(acc_g, ACT) * acc_u
        tl.store(H + rows[:, None] * shp + offs_n[None, :] * shi, h.to(H.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(H, TILE_E, TILE_START, TILE_END, W, RW, Y, d, inter,
                 shp, shi, swe, swn, swi, syp, syd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    e = tl.load(TILE_E + tile).to(tl.int64)
    if e >= 0:
        start = tl.load(TILE_START + tile)
        end = tl.load(TILE_END + tile)
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < end
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < d
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = offs_k < inter
            h = tl.load(H + rows[:, None] * shp + offs_k[None, :] * shi, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + e * swe + offs_n[None, :] * swn + offs_k[:, None] * swi,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(h, w, acc, input_precision=DOT_PREC)
        # transformers: down_e(...) in the hidden dtype, then * weight (promoted), cast once
        rw = tl.load(RW + rows, mask=row_ok, other=0.0)
        y = acc.to(H.dtype.element_ty).to(tl.float32) * rw.to(tl.float32)[:, None]
        tl.store(Y + rows[:, None] * syp + offs_n[None, :] * syd, y.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def tile_table(counts: torch.Tensor, block_m: int, num_pairs: int):
    """(expert, first row, end row) per BLOCK_M tile of the expert-sorted rows, on the device.

    Sized cdiv(P, BLOCK_M) + E (a bound on the tile count) so the grid needs no host sync;
    surplus tiles get expert -1.
    """
    E = counts.shape[0]
    max_tiles = triton.cdiv(num_pairs, block_m) + E
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(max_tiles, device=counts.device)
    e = torch.searchsorted(tile_end, t, right=True)  # expert owning tile t (E when past the last)
    ec = e.clamp(max=E - 1)
    local = t - (tile_end[ec] - tiles[ec])
    start = starts[ec] + local * block_m
    return torch.where(e < E, e, -1), start, ends[ec]


def moe_experts_triton(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act: str,
                       block_m: int = 16, block_n: int = 64, block_k: int = 64):
    """Same contract as ``moe_experts_reference``, on the two grouped-GEMM kernels."""
    N, k = top_k_index.shape
    out = torch.zeros_like(hidden)
    if N == 0:
        return out
    E, two_i, d = gate_up_proj.shape
    inter = two_i // 2
    flat = top_k_index.t().reshape(-1)  # slot-major pair ids p = slot * N + token
    expert_sorted, order = torch.sort(flat, stable=True)
    token, slot = order % N, order // N
    counts = torch.bincount(expert_sorted, minlength=E)
    tile_e, tile_start, tile_end = tile_table(counts, block_m, N * k)
    P = N * k
    prec = "ieee" if hidden.dtype.itemsize == 4 else "tf32"
    h = hidden.new_empty((P, inter))
    _gate_up_kernel[(tile_e.shape[0], triton.cdiv(inter, block_n))](
        hidden, token, tile_e, tile_start, tile_end, gate_up_proj, h, d, inter,
        *hidden.stride(), *gate_up_proj.stride(), *h.stride(),
        ACT=ACTS[act], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PREC=prec)
    rw = top_k_weights[token, slot].contiguous()  # the pair's routing weight, in sorted order
    y = hidden.new_empty((P, d))
    _down_kernel[(tile_e.shape[0], triton.cdiv(d, block_n))](
        h, tile_e, tile_start, tile_end, down_proj, rw, y, d, inter,
        *h.stride(), *down_proj.stride(), *y.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PREC=prec)
    out.index_add_(0, token, y)
    return out


def fused_moe_triton(hidden, router_weight, router_bias, gate_up_proj, down_proj, router: str, top_k: int,
                     act: str, jitter_eps: float, norm_topk_prob: bool):
    """``graphwright.fused_moe`` on Triton: exact routing in torch, experts on the grouped GEMMs."""
    logits = router_logits(hidden, router_weight, router_bias)
    weights, index = route(router, logits, top_k, jitter_eps, norm_topk_prob)
    return moe_experts_triton(hidden, index, weights, gate_up_proj, down_proj, act), logits
