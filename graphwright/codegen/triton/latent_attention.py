"""Latent-key attention kernel for ``graphwright.latent_attention`` (LoRC low-rank KV cache).

Based on LoRC (arXiv:2410.03111) and MLA's weight absorption (DeepSeek-V2, arXiv:2405.04434).
The cache holds c_k [B, S, r_k] and c_v [B, S, r_v]; K and V are never written to memory:

* per key tile the kernel rebuilds K_h = c_k @ k_up_h + k_bias_h for its KV head and rotates
  it at the keys' absolute positions: RoPE (rotate_half convention) is
  K * cos + rotate_half(K) * sin, and rotate_half(c_k @ A) = c_k @ rotate_half(A), so a second
  small GEMM against the column-rotated up-projection (prepared once per call, [r_k, D]) gives
  the rotated half with no lane shuffles; cos/sin come from k_pos and inv_freq in fp32.
* values stay latent: the softmax-weighted sum runs over c_v (r_v wide, shared by every head),
  and only the finished [rows, r_v] result is multiplied by v_up_h (+ v_bias_h, exact because
  softmax rows sum to 1) in reconstruct mode; in absorbed mode (v_up None, folded into o_proj
  by the pass) the latent result is the output.
* the optional key RMSNorm (``k_norm``, Qwen3/Gemma3) sits between the rebuild and RoPE: one
  fp32 reciprocal RMS per key from the unrotated K, which scales both K and its rotate_half
  partner; rotate_half(w * K) = swap_halves(w) * rotate_half(K), so the partner is multiplied by
  the half-swapped weight (prepared once per call).
* ``key_bias`` [B, H, S] (PASTA steering) is one [rows, BLOCK_N] tile per key block, added to the
  scores before masking; ``sinks`` is a runtime int of the visibility test (no block skipping here).
* one program per (row block, batch row, KV head) packs the G query heads of the group and the T
  query positions into its rows, so each K tile is rebuilt once per KV head, not once per query
  head; at decode (T = 1) the G heads fill the tile.

Shapes: q [B, H, T, D], k_up [r_k, Hk*D], v_up [r_v, Hk*Dv] | None, q_pos [B, T], k_pos [B, S]
-> [B, H, T, Dv] (reconstruct) or [B, H, T, r_v] (absorbed), in q's dtype.
Constexpr flags: HAS_KBIAS, HAS_ROPE, HAS_VUP, HAS_VBIAS, HAS_WINDOW, HAS_BIAS (key_bias), HAS_KNORM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_prefill import LOG2E, _visible


@triton.jit
def _latent_kernel(
    Q, CK, CV, KA, KAR, KB, KBR, FREQ, VUP, VB, QPOS, KPOS, BIAS, KNW, KNWS, OUT,
    scale_log2, rope_scaling, window, sinks, knorm_eps, T, S, Hk, G, RK, RV, R,
    sqb, sqh, sqt, sqd, sckb, scks, sckr, scvb, scvs, scvr, skar, skah, skad, svur, svuh, svud,
    sqpb, sqpt, skpb, skps, sbb, sbh, sbs, sob, soh, sot, sod,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KBIAS: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_VUP: tl.constexpr, HAS_VBIAS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KNORM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // Hk).to(tl.int64)
    hk = (pid_bk % Hk).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = offs_r < G * T
    h = hk * G + offs_r // T
    t = offs_r % T
    offs_d = tl.arange(0, BLOCK_D)
    offs_rk = tl.arange(0, BLOCK_RK)
    offs_rv = tl.arange(0, BLOCK_RV)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qp = tl.load(QPOS + b * sqpb + t * sqpt, mask=row_ok, other=-1)

    # this KV head's up-projection [r_k, D] and its rotate_half partner, loaded once
    a_off = offs_rk[:, None] * skar + hk * skah + offs_d[None, :] * skad
    a_mask = (offs_rk[:, None] < RK) & d_ok[None, :]
    ka = tl.load(KA + a_off, mask=a_mask, other=0.0)
    if HAS_ROPE:
        kar = tl.load(KAR + a_off, mask=a_mask, other=0.0)
        freq = tl.load(FREQ + offs_d, mask=d_ok, other=0.0)
    if HAS_KBIAS:
        kb = tl.load(KB + hk * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_ROPE:
            kbr = tl.load(KBR + hk * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_KNORM:
        knw = tl.load(KNW + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_ROPE:
            knws = tl.load(KNWS + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_RV], tl.float32)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = offs_n < S
        kp = tl.load(KPOS + b * skpb + offs_n * skps, mask=col_ok, other=-1)
        ck = tl.load(CK + b * sckb + offs_n[:, None] * scks + offs_rk[None, :] * sckr,
                     mask=col_ok[:, None] & (offs_rk[None, :] < RK), other=0.0)
        k = tl.dot(ck, ka, input_precision=DOT_PREC)  # [N, D] fp32
        if HAS_KBIAS:
            k += kb[None, :]
        if HAS_ROPE:
            kr = tl.dot(ck, kar, input_precision=DOT_PREC)
            if HAS_KBIAS:
                kr += kbr[None, :]
        if HAS_KNORM:  # RMS of the unrotated key over its D dims (padding lanes are 0)
            inv_rms = tl.rsqrt(tl.sum(k * k, 1) / D + knorm_eps)
            k = k * inv_rms[:, None] * knw[None, :]
            if HAS_ROPE:
                kr = kr * inv_rms[:, None] * knws[None, :]
        if HAS_ROPE:
            ang = tl.maximum(kp, 0).to(tl.float32)[:, None] * freq[None, :]  # padding rotated as position 0
            rot = (offs_d < R)[None, :]
            k = tl.where(rot, k * (tl.cos(ang) * rope_scaling) + kr * (tl.sin(ang) * rope_scaling), k)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * scale_log2
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
        cv = tl.load(CV + b * scvb + offs_n[:, None] * scvs + offs_rv[None, :] * scvr,
                     mask=col_ok[:, None] & (offs_rv[None, :] < RV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(cv.dtype), cv, input_precision=DOT_PREC)
        m_i = m_new
    lat = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # [rows, r_v]: P @ c_v
    if HAS_VUP:
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < DV
        vu = tl.load(VUP + offs_rv[:, None] * svur + hk * svuh + offs_dv[None, :] * svud,
                     mask=(offs_rv[:, None] < RV) & dv_ok[None, :], other=0.0)
        out = tl.dot(lat, vu.to(tl.float32), input_precision="ieee")
        if HAS_VBIAS:
            out += tl.load(VB + hk * DV + offs_dv, mask=dv_ok, other=0.0).to(tl.float32)[None, :]
    else:
        offs_dv = offs_rv
        dv_ok = offs_rv < RV
        out = lat
    tl.store(OUT + b * sob + h[:, None] * soh + t[:, None] * sot + offs_dv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


def rotate_half_columns(w: torch.Tensor, head_dim: int, rot_dims: int) -> torch.Tensor:
    """Apply rotate_half to the first ``rot_dims`` of each head's columns of w [..., Hk*D]; zero the rest."""
    shape = w.shape
    w = w.reshape(*shape[:-1], -1, head_dim)
    half = rot_dims // 2
    out = torch.zeros_like(w)
    out[..., :half] = -w[..., half:rot_dims]
    out[..., half:rot_dims] = w[..., :half]
    return out.reshape(shape)


def swap_halves(w: torch.Tensor, rot_dims: int) -> torch.Tensor:
    """w [D] with its first ``rot_dims`` entries' halves swapped (no sign): rotate_half(w * x) = this * rotate_half(x)."""
    half = rot_dims // 2
    return torch.cat([w[half:rot_dims], w[:half], w[rot_dims:]])


def latent_attention_triton(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, rope_scaling, scale,
                            window=0, key_bias=None, sinks=0, k_norm=None, k_norm_eps=1e-6, block_r=None,
                            block_n=None):
    """``graphwright.latent_attention`` on the latent-key kernel; same arguments and result as the reference."""
    B, H, T, D = q.shape
    S, RK, RV = c_k.shape[1], c_k.shape[2], c_v.shape[2]
    Hk = k_up.shape[1] // D
    G = H // Hk
    Dv = v_up.shape[1] // Hk if v_up is not None else RV
    R = 2 * inv_freq.shape[0] if inv_freq is not None else 0
    ka = k_up.to(q.dtype).contiguous()
    kar = rotate_half_columns(k_up, D, R).to(q.dtype).contiguous() if R else ka
    kb = k_bias.contiguous() if k_bias is not None else ka
    kbr = rotate_half_columns(k_bias, D, R).contiguous() if (R and k_bias is not None) else kb
    freq = torch.zeros(D, dtype=torch.float32, device=q.device)
    if R:
        freq[:R] = inv_freq.float().repeat(2)
    c_k, c_v = c_k.to(q.dtype), c_v.to(q.dtype)
    out = q.new_empty((B, H, T, Dv))
    block_r = block_r or max(16, min(64, triton.next_power_of_2(G * T)))
    block_n = block_n or 64
    vu = v_up.contiguous() if v_up is not None else ka
    vb = v_bias.contiguous() if v_bias is not None else ka
    knw = k_norm.float().contiguous() if k_norm is not None else freq
    knws = swap_halves(knw, R).contiguous() if (k_norm is not None and R) else knw
    bias = key_bias if key_bias is not None else q
    bias_strides = key_bias.stride() if key_bias is not None else (0, 0, 0)
    _latent_kernel[(triton.cdiv(G * T, block_r), B * Hk)](
        q, c_k, c_v, ka, kar, kb, kbr, freq, vu, vb, q_pos, k_pos, bias, knw, knws, out,
        float(scale) * LOG2E, float(rope_scaling), int(window), int(sinks), float(k_norm_eps), T, S, Hk, G, RK, RV, R,
        *q.stride(), *c_k.stride(), *c_v.stride(), ka.stride(0), D * ka.stride(1), ka.stride(1),
        vu.stride(0), Dv * vu.stride(1), vu.stride(1), *q_pos.stride(), *k_pos.stride(), *bias_strides, *out.stride(),
        D=D, DV=Dv, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        BLOCK_RK=max(16, triton.next_power_of_2(RK)), BLOCK_RV=max(16, triton.next_power_of_2(RV)),
        BLOCK_R=block_r, BLOCK_N=block_n,
        HAS_KBIAS=k_bias is not None, HAS_ROPE=R > 0, HAS_VUP=v_up is not None, HAS_VBIAS=v_bias is not None,
        HAS_WINDOW=window > 0, HAS_BIAS=key_bias is not None, HAS_KNORM=k_norm is not None, DOT_PREC="ieee" if q.dtype.itemsize == 4 else "tf32",
    )
    return out
