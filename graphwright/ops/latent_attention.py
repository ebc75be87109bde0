"""``graphwright.latent_attention``: attention over a low-rank (latent) KV cache (LoRC).

The cache holds per-token latents instead of keys and values:

* ``c_k`` [B, S, r_k] with K = RoPE(KNorm(c_k @ k_up + k_bias)), k_up [r_k, H_kv*D] (all KV heads
  jointly); KNorm is the model's optional per-head key RMSNorm (Qwen3, Gemma3),
* ``c_v`` [B, S, r_v] with V = c_v @ v_up + v_bias, v_up [r_v, H_kv*Dv].

Keys are rebuilt inside the op and then rotated at their *absolute* positions ``k_pos``
(RoPE cannot be folded into the query side: the rotation sits between k_up and the dot
product, arXiv 2410.03111 appendix), so memory falls and key compute does not.

Values have two modes:

* ``v_up`` given ("reconstruct"): V is rebuilt and the output is [B, H, T, Dv] as in
  ``graphwright.attention``.
* ``v_up`` None ("absorbed"): the op attends over the latent values directly and returns
  [B, H, T, r_v] (P_h @ c_v per query head); the caller has folded v_up (and v_bias, exact
  because softmax rows sum to 1) into the output projection.

RoPE: ``inv_freq`` [R/2] (None for models without rotary embeddings), rotate_half convention
on the first R dims of each head (R = 2 * len(inv_freq) <= D; the rest pass through, which
covers partial rotary), cos/sin scaled by ``rope_scaling`` (transformers' ``attention_scaling``).
Visibility and padding follow ``graphwright.attention`` (see ``capture/ops.py``).

Arguments appended after ``window`` (all default to "off", so older positional calls keep their
meaning), with ``graphwright.attention``'s semantics:

* ``key_bias`` [B, H, S]: additive pre-softmax bias per query head and key column (PASTA
  steering puts log(alpha) there), shared by every query row;
* ``sinks``: with ``window > 0``, the first ``sinks`` positions stay visible (StreamingLLM);
* ``k_norm`` [D] and ``k_norm_eps``: per-head RMSNorm of the rebuilt keys before RoPE,
  k * k_norm / sqrt(mean(k^2 over D) + eps) in fp32; ``k_norm`` is the effective multiplier
  (Gemma's ``1 + weight`` is folded by the pass).

Invariant tested (``tests/ops/test_latent_attention_args.py``): key_bias None or zeros gives the
old result bit for bit; a bias, sinks + window and k_norm each equal ``attention_reference`` over
explicitly rebuilt (hand-normalised) keys; the torch, Triton and ONNX lowerings match.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..capture.ops import attention_reference

_LIB = "graphwright"


def rope_keys(k: torch.Tensor, k_pos: torch.Tensor, inv_freq: torch.Tensor, rope_scaling: float) -> torch.Tensor:
    """Rotate keys k [B, Hk, S, D] at positions k_pos [B, S] (rotate_half convention).

    cos/sin are computed in fp32 like transformers' rotary embedding (padding slots, k_pos = -1,
    are rotated as position 0: they are masked out anyway) and applied in fp32.
    """
    R = 2 * inv_freq.shape[0]
    freqs = k_pos.clamp(min=0).float()[..., None] * inv_freq.float()  # [B, S, R/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, R]
    cos, sin = emb.cos() * rope_scaling, emb.sin() * rope_scaling
    kf = k.float()
    rot, rest = kf[..., :R], kf[..., R:]
    half = R // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def rms_norm_keys(k: torch.Tensor, k_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim in fp32: k_norm * k / sqrt(mean(k^2) + eps)."""
    k = k.float()
    return k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_norm.float()


def rebuild_keys(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim: int,
                 k_norm: Optional[torch.Tensor] = None, k_norm_eps: float = 1e-6) -> torch.Tensor:
    """K = RoPE_{k_pos}(KNorm(c_k @ k_up + k_bias)) as [B, H_kv, S, D] in fp32 (KNorm only with ``k_norm``)."""
    B, S, _ = c_k.shape
    k = torch.matmul(c_k.float(), k_up.float())  # [B, S, Hk*D]
    if k_bias is not None:
        k = k + k_bias.float()
    k = k.view(B, S, -1, head_dim).transpose(1, 2)  # [B, Hk, S, D]
    if k_norm is not None:
        k = rms_norm_keys(k, k_norm, k_norm_eps)
    if inv_freq is not None:
        k = rope_keys(k, k_pos, inv_freq, rope_scaling)
    return k


def rebuild_values(c_v, v_up, v_bias, num_kv_heads: int) -> torch.Tensor:
    """V = c_v @ v_up + v_bias as [B, H_kv, S, Dv] in fp32."""
    B, S, _ = c_v.shape
    v = torch.matmul(c_v.float(), v_up.float())
    if v_bias is not None:
        v = v + v_bias.float()
    return v.view(B, S, num_kv_heads, -1).transpose(1, 2)


def latent_attention_reference(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq,
                               rope_scaling: float, scale: float, window: int = 0, key_bias=None, sinks: int = 0,
                               k_norm=None, k_norm_eps: float = 1e-6) -> torch.Tensor:
    """The definition: rebuild K (and V in reconstruct mode) in fp32, then ``attention_reference``."""
    D = q.shape[-1]
    k = rebuild_keys(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, D, k_norm, k_norm_eps)
    if v_up is not None:
        v = rebuild_values(c_v, v_up, v_bias, k.shape[1])
    else:
        v = c_v.float()[:, None]  # [B, 1, S, r_v]: one latent value stream shared by every head
    out = attention_reference(q.float(), k, v, q_pos, k_pos, scale, window, key_bias, sinks)
    return out.to(q.dtype)


def _check(q, c_k, c_v, k_up, v_up, q_pos, k_pos, key_bias=None, sinks=0, k_norm=None):
    if q.dim() != 4 or c_k.dim() != 3 or c_v.dim() != 3:
        raise ValueError(f"latent_attention wants q [B,H,T,D], c_k [B,S,r_k], c_v [B,S,r_v]; got "
                         f"{tuple(q.shape)}, {tuple(c_k.shape)}, {tuple(c_v.shape)}")
    if k_up.shape[0] != c_k.shape[-1] or k_up.shape[1] % q.shape[-1]:
        raise ValueError(f"k_up {tuple(k_up.shape)} must be [r_k={c_k.shape[-1]}, H_kv*{q.shape[-1]}]")
    if q.shape[1] % (k_up.shape[1] // q.shape[-1]):
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k_up.shape[1] // q.shape[-1]})")
    if v_up is not None and v_up.shape[0] != c_v.shape[-1]:
        raise ValueError(f"v_up {tuple(v_up.shape)} must have r_v = {c_v.shape[-1]} rows")
    if c_k.shape[:2] != c_v.shape[:2] or k_pos.shape != c_k.shape[:2] or q_pos.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"shape mismatch: c_k {tuple(c_k.shape)}, c_v {tuple(c_v.shape)}, k_pos {tuple(k_pos.shape)}, "
                         f"q {tuple(q.shape)}, q_pos {tuple(q_pos.shape)}")
    B, H, _, D = q.shape
    if key_bias is not None and tuple(key_bias.shape) != (B, H, c_k.shape[1]):
        raise ValueError(f"key_bias must be [B, H, S] = {[B, H, c_k.shape[1]]}; got {list(key_bias.shape)}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0; got {sinks}")
    if k_norm is not None and tuple(k_norm.shape) != (D,):
        raise ValueError(f"k_norm must be [D] = [{D}] (one multiplier per head dim, shared by the KV heads); "
                         f"got {list(k_norm.shape)}")


@torch.library.custom_op(f"{_LIB}::latent_attention", mutates_args=())
def latent_attention(
    q: torch.Tensor,
    c_k: torch.Tensor,
    c_v: torch.Tensor,
    k_up: torch.Tensor,
    k_bias: Optional[torch.Tensor],
    v_up: Optional[torch.Tensor],
    v_bias: Optional[torch.Tensor],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    inv_freq: Optional[torch.Tensor],
    rope_scaling: float,
    scale: float,
    window: int = 0,
    key_bias: Optional[torch.Tensor] = None,
    sinks: int = 0,
    k_norm: Optional[torch.Tensor] = None,
    k_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """One layer's attention over a latent KV cache; the torch implementation is the reference."""
    _check(q, c_k, c_v, k_up, v_up, q_pos, k_pos, key_bias, sinks, k_norm)
    return latent_attention_reference(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq,
                                      rope_scaling, scale, window, key_bias, sinks, k_norm, k_norm_eps)


@latent_attention.register_fake
def _latent_attention_fake(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, rope_scaling, scale,
                           window=0, key_bias=None, sinks=0, k_norm=None, k_norm_eps=1e-6):
    B, H, T, _ = q.shape
    if v_up is None:
        dv = c_v.shape[-1]
    else:
        dv = v_up.shape[1] // (k_up.shape[1] // q.shape[-1])
    return q.new_empty((B, H, T, dv))


LATENT_ATTENTION = torch.ops.graphwright.latent_attention.default
