"""Flash-style prefill kernel for ``graphwright.attention`` (one program per query block and head).

Based on FlashAttention-2 (arXiv:2307.08691) and Triton's ``06-fused-attention.py``: online
softmax over key blocks, fp32 accumulators, scores never written to memory.

Shapes: q [B, H, T, D], k [B, Hk, S, D], v [B, Hk, S, Dv], q_pos [B, T], k_pos [B, S] or
[B, Hk, S], key_bias [B, H, S] -> out [B, H, T, Dv] in v's dtype. Semantics are
``capture.ops.attention_reference`` (the visibility rule, padding rows seeing every valid key).

Specialisation (see ``attention_dispatch`` for why these are constexpr and the rest is data):

* ``HAS_BIAS`` (PASTA steering): one [BLOCK_N] row of key_bias per key block, broadcast over
  the query rows; compiled out when absent, so plain attention pays nothing for steering.
* ``HAS_WINDOW``: the sliding-window test (with ``sinks`` as a runtime int) and the skipping of
  key blocks left of every query's window.
* GQA and per-head cache lengths are strides, not flags: head h reads KV head h // G, and a
  shared k_pos [B, S] is passed with head stride 0, so an evicted per-head cache [B, Hk, S] is
  the same code reading a different row.

Masking keeps the reference's numerics: invisible in-range keys get a large finite negative
score (a row with no visible key would average every column, as the reference's
``finfo.min`` fill does, instead of producing NaN) and out-of-range columns -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MASKED = -1.0e30  # finite: exp2(MASKED - m) underflows to 0 once any visible key was seen


@triton.jit
def _visible(qp, kp, window, sinks, HAS_WINDOW: tl.constexpr):
    """[M, N] visibility of keys at kp [N] for queries at qp [M] (capture.ops.visible_mask)."""
    causal = kp[None, :] <= qp[:, None]
    if HAS_WINDOW:
        causal = causal & (((qp[:, None] - kp[None, :]) < window) | (kp[None, :] < sinks))
    return (kp[None, :] >= 0) & (causal | (qp[:, None] < 0))


@triton.jit
def _attn_prefill_kernel(
    Q, K, V, QPOS, KPOS, BIAS, OUT,
    scale_log2, window, sinks, T, S, H, G,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    sqpb, sqpt, skpb, skph, skps, sbb, sbh, sbs, sob, soh, sot, sod,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*T*D passes 2^31 at long contexts
    h = (pid_bh % H).to(tl.int64)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < T

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    qp = tl.load(QPOS + b * sqpb + offs_m * sqpt, mask=row_ok, other=-1)
    # block skipping bounds: padding rows (q_pos < 0) see every key, so they disable skipping
    q_max = tl.max(tl.where(row_ok, qp, -1), 0)
    any_pad = tl.min(tl.where(row_ok, qp, 0), 0) < 0
    q_min = tl.min(tl.where(row_ok, qp, 1 << 62), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kp_base = KPOS + b * skpb + hk * skph
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = offs_n < S
        kp = tl.load(kp_base + offs_n * skps, mask=col_ok, other=-1)
        k_min = tl.min(tl.where(kp >= 0, kp, 1 << 62), 0)
        needed = any_pad | (k_min <= q_max)
        if HAS_WINDOW:
            k_max = tl.max(kp, 0)
            needed = needed & (any_pad | (k_max > q_min - window) | (k_min < sinks))
        if needed:
            k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd,
                        mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
            if HAS_BIAS:
                bias = tl.load(BIAS + b * sbb + h * sbh + offs_n * sbs, mask=col_ok, other=0.0)
                s += bias.to(tl.float32)[None, :] * 1.4426950408889634
            s = tl.where(_visible(qp, kp, window, sinks, HAS_WINDOW), s, -1.0e30)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * svs + offs_dv[None, :] * svd,
                        mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * sot + offs_dv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


def attention_prefill(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, sinks=0, block_m=None, block_n=None):
    """Launch the prefill kernel; arguments as ``graphwright.attention``. Returns [B, H, T, Dv]."""
    B, H, T, D = q.shape
    Hk, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = q.new_empty((B, H, T, Dv), dtype=v.dtype)
    kp_strides = (k_pos.stride(0), 0, k_pos.stride(1)) if k_pos.dim() == 2 else k_pos.stride()
    bias_strides = key_bias.stride() if key_bias is not None else (0, 0, 0)
    block_m = block_m or (16 if T <= 16 else 64)
    block_n = block_n or 64
    block_d, block_dv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    grid = (triton.cdiv(T, block_m), B * H)
    _attn_prefill_kernel[grid](
        q, k, v, q_pos, k_pos, key_bias if key_bias is not None else q, out,
        float(scale) * LOG2E, int(window), int(sinks), T, S, H, H // Hk,
        *q.stride(), *k.stride(), *v.stride(), *q_pos.stride(), *kp_strides, *bias_strides, *out.stride(),
        D=D, DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_BIAS=key_bias is not None, HAS_WINDOW=window > 0,
        DOT_PREC="ieee" if q.dtype.itemsize == 4 else "tf32",
    )
    return out
