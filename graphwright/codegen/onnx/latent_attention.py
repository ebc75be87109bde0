"""ONNX translation of ``graphwright.latent_attention`` (LoRC): MatMuls and RoPE around opset-23 Attention.

The cache inputs/outputs of the artifact are the latents c_k [B, S, r_k] and c_v [B, S, r_v], so
the ONNX model keeps the memory saving. Per step the translation does what the reference
(``ops/latent_attention.py``) does, in fp32:

* K = RoPE_{k_pos}(KNorm(c_k @ k_up + k_bias)) reshaped to [B, H_kv, S, D] (KNorm, only with
  ``k_norm``, is ReduceMean/Sqrt/Div/Mul over D; rotate_half on the first R = 2 len(inv_freq)
  dims, positions clamped at 0 for empty slots, cos/sin times rope_scaling);
* V = c_v @ v_up + v_bias per KV head (reconstruct), or in absorbed mode the latent c_v itself,
  one value stream shared by all heads (broadcast to the KV heads, since ``Attention`` wants K
  and V to have the same head count; v_head_size = r_v may differ from D);
* the visibility mask (with ``sinks``), ``key_bias`` added into it, and ``Attention`` are the
  ones of ``graphwright.attention``.
"""

from __future__ import annotations

from onnxscript import opset23 as op

from ...ops.eviction import LATENT_KEYS
from ...ops.latent_attention import LATENT_ATTENTION
from .translations import FLOAT, additive_mask, register


def _heads(x, num_heads: int):
    """[B, S, n*E] -> [B, n, S, E]."""
    return op.Transpose(op.Reshape(x, op.Constant(value_ints=[0, 0, num_heads, -1])), perm=[0, 2, 1, 3])


def _rope(k, k_pos, inv_freq, rope_scaling: float, head_dim: int):
    """Rotate k [B, Hk, S, D] (fp32) at positions k_pos [B, S]; rotate_half convention, the first 2 len(inv_freq) dims.

    One opset-23 ``RotaryEmbedding`` on cos/sin [B, S, R/2] of the positions (times rope_scaling): ORT's kernel rotates in
    one pass where the Slice/Neg/Concat/Mul/Add form wrote five [B, Hk, S, D] intermediates per layer and step. On the
    lowrank_kv(keep=0.5) artifact of smollm2-135m at 2,048 tokens (``bench/profile_onnx_decode.py --threads 1``, machine
    shared, so indicative) those ops took ~81 of the step's 272 kernel ms; the 60 ``RotaryEmbedding`` nodes (queries and
    keys) take ~15, and decode ran 1.50x faster (1.49x less process CPU per step) than the previous artifact, alternating
    in one process (``bench/profile_onnx_decode.py OLD NEW --compare 3 --prompt 2048 --new 16 --threads 1``). The cos/sin
    subgraph is the same in every layer of a step (same k_pos, same inv_freq), so ORT's common-subexpression elimination
    computes it once per step. (Building the keys per KV head, [B, 1, S, r] @ [Hk, r, D], to skip the transpose of K was
    slower than one GEMM and the transpose in the same A/B: 1.39x.)"""
    half = inv_freq.shape[0]
    rdim = 2 * half
    pos = op.Cast(op.Max(k_pos, op.Constant(value_int=0)), to=FLOAT)
    freqs = op.Mul(op.Unsqueeze(pos, [2]), op.Cast(inv_freq, to=FLOAT))  # [B, S, R/2]
    scaling = op.Constant(value_float=float(rope_scaling))
    cos, sin = op.Mul(op.Cos(freqs), scaling), op.Mul(op.Sin(freqs), scaling)
    return op.RotaryEmbedding(k, cos, sin, rotary_embedding_dim=rdim if rdim < head_dim else 0, interleaved=0)


def _rms_norm(k, k_norm, eps: float):
    """k_norm * k / sqrt(mean(k^2 over the last dim) + eps), fp32."""
    ms = op.ReduceMean(op.Mul(k, k), op.Constant(value_ints=[-1]), keepdims=1)
    rms = op.Sqrt(op.Add(ms, op.Constant(value_float=float(eps))))
    return op.Mul(op.Div(k, rms), op.Cast(k_norm, to=FLOAT))


def _keys(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling: float, head_dim: int, k_norm=None,
          k_norm_eps: float = 1e-6):
    """K = RoPE_{k_pos}(KNorm(c_k @ k_up + k_bias)) as [B, H_kv, S, D] fp32."""
    k = op.MatMul(op.Cast(c_k, to=FLOAT), op.Cast(k_up, to=FLOAT))
    if k_bias is not None:
        k = op.Add(k, op.Cast(k_bias, to=FLOAT))
    k = _heads(k, k_up.shape[1] // head_dim)
    if k_norm is not None:
        k = _rms_norm(k, k_norm, k_norm_eps)
    return _rope(k, k_pos, inv_freq, rope_scaling, head_dim) if inv_freq is not None else k


@register(LATENT_KEYS)
def latent_keys(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling: float, head_dim: int, k_norm=None,
                k_norm_eps: float = 1e-6):
    """The keys an eviction op scores a latent layer with (lowrank_kv + h2o/snapkv/fastgen)."""
    return _keys(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm, k_norm_eps)


@register(LATENT_ATTENTION)
def latent_attention(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq,
                     rope_scaling: float, scale: float, window: int = 0, key_bias=None, sinks: int = 0,
                     k_norm=None, k_norm_eps: float = 1e-6):
    num_heads, head_dim = q.shape[1], q.shape[3]
    num_kv = k_up.shape[1] // head_dim
    k = _keys(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm, k_norm_eps)
    if v_up is not None:
        v = op.MatMul(op.Cast(c_v, to=FLOAT), op.Cast(v_up, to=FLOAT))
        if v_bias is not None:
            v = op.Add(v, op.Cast(v_bias, to=FLOAT))
        v = _heads(v, num_kv)
    else:  # absorbed: the latent values, the same stream for every KV head
        v = op.Unsqueeze(op.Cast(c_v, to=FLOAT), [1])
        if num_kv > 1:
            v = op.Expand(v, op.Constant(value_ints=[1, num_kv, 1, 1]))
    mask = additive_mask(q_pos, k_pos, window, num_heads, key_bias, sinks)
    y, _, _, _ = op.Attention(op.Cast(q, to=FLOAT), k, v, mask, scale=float(scale),
                              q_num_heads=int(num_heads), kv_num_heads=int(num_kv))
    return op.CastLike(y, q)
