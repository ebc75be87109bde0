"""Split-K decode kernel for ``graphwright.attention`` (few query rows, long cache).

Based on Flash-Decoding (Dao et al. 2023, the split-KV scheme in FlashAttention-2's
``flash_fwd_splitkv``): at decode T is 1, so one program per (row, head) would leave the GPU
idle and read K/V once per query head. Instead:

* one program per (batch row, KV head, split) packs the G = H / Hk query heads of the group (and
  the T query positions, T = 1 at decode) into BLOCK_R >= 16 rows of one ``tl.dot``, so each K/V
  tile is read once for the whole group (GQA is where decode saves its bandwidth);
* the key axis is cut into ``num_splits`` contiguous chunks processed in parallel; each writes an
  unnormalised partial (acc / l and its log-sum-exp) and ``_combine_kernel`` merges them.

Shapes: as ``attention_prefill``. Specialisation flags are the same (``HAS_BIAS``,
``HAS_WINDOW``; k_pos per head by stride). Padding rows and empty slots follow the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_prefill import LOG2E, _visible


@triton.jit
def _attn_decode_kernel(
    Q, K, V, QPOS, KPOS, BIAS, OPART, LPART,
    scale_log2, window, sinks, T, S, Hk, G, chunk,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    sqpb, sqpt, skpb, skph, skps, sbb, sbh, sbs,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bk // Hk).to(tl.int64)  # 64-bit offsets: long caches pass 2^31 elements
    hk = (pid_bk % Hk).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = offs_r < G * T
    h = hk * G + offs_r // T  # packed row r = (head in group, query position)
    t = offs_r % T
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    qp = tl.load(QPOS + b * sqpb + t * sqpt, mask=row_ok, other=-1)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, S)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = offs_n < end
        kp = tl.load(KPOS + b * skpb + hk * skph + offs_n * skps, mask=col_ok, other=-1)
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        if HAS_BIAS:
            bias = tl.load(BIAS + b * sbb + h[:, None] * sbh + offs_n[None, :] * sbs,
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(_visible(qp, kp, window, sinks, HAS_WINDOW), s, -1.0e30)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_dv[None, :] * svd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    # partial result of this split: normalised output and its log2-sum-exp (-inf when empty)
    nonempty = l_i > 0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    base = (pid_bk * NUM_SPLITS + split) * BLOCK_R
    tl.store(OPART + (base + offs_r[:, None]) * BLOCK_DV + offs_dv[None, :], o)
    tl.store(LPART + base + offs_r, lse)


@triton.jit
def _combine_kernel(OPART, LPART, OUT, T, Hk, G, sob, soh, sot, sod,
                    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SPLITS: tl.constexpr):
    pid_bk = tl.program_id(0)
    b = (pid_bk // Hk).to(tl.int64)
    hk = (pid_bk % Hk).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = pid_bk * NUM_SPLITS * BLOCK_R
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(LPART + base + s * BLOCK_R + offs_r))
    m = tl.where(m > float("-inf"), m, 0.0)
    wsum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.exp2(tl.load(LPART + base + s * BLOCK_R + offs_r) - m)
        o = tl.load(OPART + (base + s * BLOCK_R + offs_r[:, None]) * BLOCK_DV + offs_dv[None, :])
        acc += w[:, None] * o
        wsum += w
    out = acc / tl.where(wsum > 0, wsum, 1.0)[:, None]
    row_ok = offs_r < G * T
    h = hk * G + offs_r // T
    t = offs_r % T
    tl.store(OUT + b * sob + h[:, None] * soh + t[:, None] * sot + offs_dv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


def default_splits(batch_kv_heads: int, S: int, block_n: int, device: torch.device) -> int:
    """Enough (row, KV head, split) programs to fill the GPU twice over, at least one key block each."""
    blocks = triton.cdiv(S, block_n)
    if device.type != "cuda":
        return min(blocks, 4)  # interpreter: exercise the combine without many slow programs
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(2 * sms, batch_kv_heads), 64))


def attention_decode(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, sinks=0, num_splits=None, block_n=None):
    """Launch split-K decode + combine; arguments as ``graphwright.attention``. Returns [B, H, T, Dv]."""
    B, H, T, D = q.shape
    Hk, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hk
    block_n = block_n or 64
    splits = num_splits or default_splits(B * Hk, S, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    block_r = max(16, triton.next_power_of_2(G * T))
    block_d, block_dv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    o_part = torch.empty((B * Hk, splits, block_r, block_dv), dtype=torch.float32, device=q.device)
    l_part = torch.empty((B * Hk, splits, block_r), dtype=torch.float32, device=q.device)
    out = q.new_empty((B, H, T, Dv), dtype=v.dtype)
    kp_strides = (k_pos.stride(0), 0, k_pos.stride(1)) if k_pos.dim() == 2 else k_pos.stride()
    bias_strides = key_bias.stride() if key_bias is not None else (0, 0, 0)
    _attn_decode_kernel[(B * Hk, splits)](
        q, k, v, q_pos, k_pos, key_bias if key_bias is not None else q, o_part, l_part,
        float(scale) * LOG2E, int(window), int(sinks), T, S, Hk, G, chunk,
        *q.stride(), *k.stride(), *v.stride(), *q_pos.stride(), *kp_strides, *bias_strides,
        D=D, DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_R=block_r, BLOCK_N=block_n, NUM_SPLITS=splits,
        HAS_BIAS=key_bias is not None, HAS_WINDOW=window > 0,
        DOT_PREC="ieee" if q.dtype.itemsize == 4 else "tf32",
    )
    _combine_kernel[(B * Hk,)](o_part, l_part, out, T, Hk, G, *out.stride(),
                               DV=Dv, BLOCK_DV=block_dv, BLOCK_R=block_r, NUM_SPLITS=splits)
    return out
