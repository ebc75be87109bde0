"""Torch-backend latent attention (LoRC): rebuild the keys once per step, attend, apply V's up-projection last.

Same semantics as ``graphwright.ops.latent_attention.latent_attention_reference`` (tested against
it in ``tests/ops/test_latent_attention_fast.py`` on random inputs: RoPE full/partial/none,
k_norm, k_bias, key_bias, window + sinks, both value modes, ragged ``k_pos`` with -1 slots,
fp32 and fp16). All arithmetic is fp32 (like the reference); the output is cast to q's dtype.

Decode (T <= ``DECODE_MAX_T`` queries), per layer and step:

1. keys, one [B*S, r_k] x [r_k, H_kv*D] GEMM for all KV heads (``rebuild_keys_fast``), k_bias,
   the optional key RMSNorm, then RoPE applied in place with cos/sin gathered from a per-model
   table (``rope_table.py``: built once, one gather per step shared by the 30 layers, instead of
   cos/sin of every cached position in every layer);
2. scores: the G query heads of a KV group folded into the query axis, [G*T, D] x [D, S] per KV
   head, read straight from the [B, S, H_kv, D] GEMM output (no transpose copy, no K/V repeat for
   GQA); key_bias, the position mask and softmax in fp32;
3. values, never rebuilt: attention over the latents c_v [B, S, r_v] (one stream shared by all
   heads: a single [H*T, S] x [S, r_v] GEMM per batch row), then in reconstruct mode one
   [r_v -> Dv] GEMM per KV head plus v_bias. Exact: out = P (c_v B_V + b_V) = (P c_v) B_V + b_V
   because every softmax row sums to 1 (also a fully masked row, which the reference spreads
   uniformly). It reads r_v instead of H_kv*Dv floats per token and does r_v*Dv*2 FLOPs per query
   head instead of S*r_v*Dv*2 per KV head.
4. window (+ sinks) with one query: only the visible columns (at most window + sinks) are
   gathered from c_k, c_v, k_pos and key_bias before step 1, so only those keys are rebuilt.

Why the key up-projection is not absorbed into the query: q . RoPE_p(c B_K) = (R_{-p} q) B_K^T . c,
and R_{-p} depends on the key position, so the absorbed query differs per cached token. Split per
rotary frequency pair, the score is sum_i cos(p w_i) (c . a_i) + sin(p w_i) (c . b_i) with a_i,
b_i in R^{r_k} per *query* head: a [S, r_k] x [r_k, D] GEMM per query head, G times the rebuild
(which is per KV head). Rebuilding per KV head, once, is the cheapest exact form.

``latent_keys_fast`` serves ``graphwright.latent_keys`` (the keys that block_sparse and streaming
unfold from a latent layer) with the same GEMM + table RoPE.

Prefill (T > ``DECODE_MAX_T``) rebuilds K with the same GEMM + table RoPE, V with one GEMM in
reconstruct mode, and calls SDPA (its fused kernel does not materialise the T x S scores).

Arithmetic, smollm2-135m (30 layers, H=9, H_kv=3, D=64; keep=0.5 progressive: sum r_k = 2,903,
sum r_v = 2,857 over the layers, mean ~96), fp32, B=1, one decode step, attention only:

  ========  =================  ===========  ==================  ===========================
  tokens S  dense: bytes read  dense: FLOPs  latent: bytes read  latent: FLOPs (key rebuild)
  ========  =================  ===========  ==================  ===========================
  1,024     47.2 MB            70.8 M       23.6 MB             1,265 M (1,142 M)
  4,096     188.7 MB           283.1 M      94.4 MB             5,060 M (4,566 M)
  8,192     377.5 MB           566.2 M      188.7 MB            10,120 M (9,132 M)
  ========  =================  ===========  ==================  ===========================

Per token and layer: dense reads 2*H_kv*D*4 = 1,536 B and does 2*2*H*D = 2,304 FLOPs; latent
reads (r_k + r_v)*4 B and does 2*r_k*H_kv*D (rebuild) + ~6*H_kv*D (RoPE) + 2*H*D (scores) +
2*H*r_v (P c_v) FLOPs: ~18x the FLOPs for half the bytes. On a 2-core CPU at ~20 GB/s and
~100 GFLOP/s fp32, dense attention is bandwidth-bound (4k: 188.7 MB / 20 GB/s = 9.4 ms; its FLOPs
alone 2.8 ms) and latent attention compute-bound (4k: 5.06 GFLOP / 100 GFLOP/s = 51 ms; its bytes
alone 4.7 ms), ~5.4x dense's time at every length (both grow linearly in S). So latent attention
cannot beat dense on this CPU at keep=0.5. Break-even per layer with r_k = r_v = r: the bytes
saved, (2*H_kv*D - 2r)*4 / 20 GB/s, against the rebuild, 2*r*H_kv*D / 100 GFLOP/s, gives r < ~12
(keep ~0.06): never at a usable quality. With a higher FLOP/byte balance the bound moves: an
H200-class GPU (~4.8 TB/s) gives r < ~33 on fp32 CUDA cores (~60 TFLOP/s) and r < ~130 with a
bf16 cache on tensor cores (~990 TFLOP/s, 2 bytes per value), where keep=0.5 (r ~96) would win.
Whole decode step, adding ~540 MB of fp32 weights (~27 ms at 20 GB/s): dense ~29 ms (1k) /
~36 ms (4k) / ~46 ms (8k), latent ~40 / ~78 / ~128 ms, so by this estimate lowrank/dense tokens/s
falls from ~0.74 at 1k to ~0.47 at 4k and ~0.36 at 8k. An implementation can only approach that
FLOP bound; what this one removed is the work around the key GEMM that the previous torch path
did per layer and step: cos/sin of every cached position, a transposed [B, H_kv, S, D] copy of
K, SDPA over latent values broadcast to the KV heads, and (reconstruct mode) the [S, H_kv*Dv]
value rebuild.
"""

from __future__ import annotations

import torch

from ...capture.ops import visible_mask
from .attention import attention_sdpa
from .rope_table import rope_cos_sin, rotate_rows

KEY_BLOCK = 512
"""Keys rebuilt per block of cached tokens in the decode path (512 x H_kv*D fp32 = 384 KiB for SmolLM2)."""

DECODE_MAX_T = 16
"""At most this many queries per row take the decode path (scores [B, H, T, S] materialised)."""


def rebuild_keys_fast(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim: int, k_norm=None, k_norm_eps=1e-6,
                      cos_sin=None):
    """K = RoPE_{k_pos}(KNorm(c_k @ k_up + k_bias)) as a contiguous fp32 [B, S, H_kv, D] (in-place after the GEMM).

    ``cos_sin``: this block's rows of ``rope_cos_sin(k_pos, ...)`` when the caller already has them.
    """
    B, S, r = c_k.shape
    k = torch.mm(c_k.reshape(B * S, r).float(), k_up.float())  # [B*S, Hk*D]
    if k_bias is not None:
        k.add_(k_bias.float())
    k = k.view(B, S, -1, head_dim)
    if k_norm is not None:
        k.mul_(torch.rsqrt(k.pow(2).mean(-1, keepdim=True).add_(k_norm_eps))).mul_(k_norm.float())
    if inv_freq is not None:
        cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(k_pos, inv_freq, rope_scaling)  # [B, S, R/2]
        rotate_rows(k, cos[:, :, None], sin[:, :, None], inplace=True)
    return k


def latent_keys_fast(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm=None, k_norm_eps=1e-6):
    """``graphwright.latent_keys`` (block_sparse / streaming over latent layers): [B, H_kv, S, D] fp32, a transposed view."""
    return rebuild_keys_fast(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm, k_norm_eps).transpose(1, 2)


def _visible_columns(c_k, c_v, q_pos, k_pos, key_bias, window: int, sinks: int):
    """One query per row with a window: keep only the <= window + sinks visible columns, in cache order.

    None when a row could see more (a padding query, q_pos < 0, sees every filled slot) or nothing
    (the reference then spreads the row over all S columns): the caller attends over all columns.
    """
    width = window + sinks
    visible = visible_mask(q_pos, k_pos, window, sinks)[:, 0, 0, 0]  # [B, S]
    count = visible.sum(-1)
    if bool((count == 0).any()) or bool((count > width).any()):
        return None
    cols = torch.sort(visible.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :width]
    take = visible.gather(1, cols)
    k_pos = torch.where(take, k_pos.gather(1, cols), -1)  # columns past a short row's visible set: empty
    c_k = c_k.gather(1, cols[:, :, None].expand(-1, -1, c_k.shape[2]))
    c_v = c_v.gather(1, cols[:, :, None].expand(-1, -1, c_v.shape[2]))
    if key_bias is not None:
        key_bias = key_bias.gather(2, cols[:, None, :].expand(-1, key_bias.shape[1], -1))
    return c_k, c_v, k_pos, key_bias


def latent_decode(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, rope_scaling, scale,
                  window=0, key_bias=None, sinks=0, k_norm=None, k_norm_eps=1e-6):
    """Few queries per row: steps 1-4 of the module docstring; returns [B, H, T, Dv | r_v] in q's dtype."""
    B, H, T, D = q.shape
    if window > 0 and T == 1 and c_k.shape[1] > 2 * (window + sinks):
        cut = _visible_columns(c_k, c_v, q_pos, k_pos, key_bias, window, sinks)
        if cut is not None:
            c_k, c_v, k_pos, key_bias = cut
    S = c_k.shape[1]
    Hk = k_up.shape[1] // D
    g = H // Hk
    qg = q.float().reshape(B, Hk, g * T, D) * scale
    cos_sin = rope_cos_sin(k_pos, inv_freq, rope_scaling) if inv_freq is not None else None
    scores = torch.empty(B, Hk, g * T, S, dtype=torch.float32, device=q.device)
    for s0 in range(0, S, KEY_BLOCK):  # a block of keys stays in cache from its GEMM to its scores
        s1 = min(S, s0 + KEY_BLOCK)
        cs = (cos_sin[0][:, s0:s1], cos_sin[1][:, s0:s1]) if cos_sin is not None else None
        k = rebuild_keys_fast(c_k[:, s0:s1], k_up, k_bias, k_pos[:, s0:s1], inv_freq, rope_scaling, D, k_norm, k_norm_eps, cs)
        scores[..., s0:s1] = torch.matmul(qg, k.permute(0, 2, 3, 1))
    scores = scores.view(B, Hk, g, T, S)
    if key_bias is not None:
        scores.add_(key_bias.float().view(B, Hk, g, 1, S))
    scores.masked_fill_(~visible_mask(q_pos, k_pos, window, sinks), torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    pc = torch.bmm(probs.view(B, H * T, S), c_v.float())  # [B, H*T, r_v]: latent values, shared by every head
    if v_up is None:
        return pc.view(B, H, T, -1).to(q.dtype)
    r_v = c_v.shape[2]
    up = v_up.float().view(r_v, Hk, -1).transpose(0, 1)  # [Hk, r_v, Dv]
    out = torch.matmul(pc.view(B, Hk, g * T, r_v), up)  # [B, Hk, g*T, Dv]
    if v_bias is not None:
        out = out + v_bias.float().view(Hk, 1, -1)
    return out.view(B, H, T, -1).to(q.dtype)


def latent_attention_sdpa(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, rope_scaling, scale,
                          window=0, key_bias=None, sinks=0, k_norm=None, k_norm_eps=1e-6):
    """The torch backend's op: ``latent_decode`` for T <= DECODE_MAX_T, else rebuilt K/V and SDPA."""
    if q.shape[2] <= DECODE_MAX_T:
        return latent_decode(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, rope_scaling, scale,
                             window, key_bias, sinks, k_norm, k_norm_eps)
    B, S, _ = c_k.shape
    k = rebuild_keys_fast(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, q.shape[-1], k_norm, k_norm_eps)
    Hk = k.shape[2]
    k = k.transpose(1, 2).to(q.dtype)
    if v_up is not None:
        v = torch.mm(c_v.reshape(B * S, -1).float(), v_up.float())
        if v_bias is not None:
            v.add_(v_bias.float())
        v = v.view(B, S, Hk, -1).transpose(1, 2).to(q.dtype)
    else:
        v = c_v[:, None].expand(B, Hk, S, c_v.shape[2]).to(q.dtype)
    return attention_sdpa(q, k, v, q_pos, k_pos, scale, window, key_bias, sinks)

