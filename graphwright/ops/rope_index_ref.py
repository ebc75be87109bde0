"""Pure-torch references for StreamingLLM's RoPE-by-cache-index (arXiv 2309.17453, ``pos_shift``).

The model rotates q and k at their absolute positions p (rotate_half convention on the first
R = 2 * len(inv_freq) dims, cos/sin scaled by ``scaling`` = transformers' attention_scaling).
StreamingLLM caches keys *before* RoPE and rotates every key by its index in the cache and the
query by its own index, so positions in use never exceed the cache size.

We recover pre-RoPE tensors by applying the inverse rotation with the very same fp32 angles the
model used (fp32(p * inv_freq), the elementwise product of the captured graph), then dividing by
``scaling``: exact in real arithmetic, ~1e-7 relative in fp32 (half precision models: the post-RoPE
input is already rounded, so expect their usual ~1e-3). Rebuilding k from the k_proj node instead
would need architecture-specific pattern matching (biases, norms such as Qwen3's k_norm); the
inversion only needs the rotary table.
"""

from __future__ import annotations

import torch


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor):
    """cos, sin [..., R] fp32 at integer positions ``pos`` (negative = padding, rotated as 0)."""
    freqs = pos.clamp(min=0).float()[..., None] * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin, gain: float):
    """gain * (x cos + rotate_half(x) sin) on the first R dims of x [B, H, T, D]; the rest pass through."""
    R = cos.shape[-1]
    xr, rest = x[..., :R].float(), x[..., R:]
    half = R // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = ((xr * cos + rot * sin) * gain).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def rope_invert_reference(x, pos, inv_freq, scaling: float):
    """Pre-RoPE x [B, H, T, D] from x rotated at absolute positions ``pos`` [B, T]."""
    cos, sin = rope_angles(pos, inv_freq)
    return _rotate(x, cos[:, None], -sin[:, None], 1.0 / scaling)


def cache_index(k_pos: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S] long: each slot's index among the valid (k_pos >= 0) slots of its row and head."""
    valid = k_pos >= 0
    return (valid.long().cumsum(dim=-1) - 1).clamp(min=0)


def rope_cache_index_reference(q, k, k_pos, inv_freq, scaling: float):
    """Rotate pre-RoPE k [B, Hk, S, D] by cache index and q [B, H, T, D] by its own slot's index.

    The step's T queries are the last T slots of k (the step graph appends new tokens at the end).
    Returns (q_rot, k_rot).
    """
    H, T = q.shape[1], q.shape[2]
    Hk, S = k.shape[1], k.shape[2]
    idx = cache_index(k_pos)
    ck, sk = rope_angles(idx, inv_freq)  # [B, Hk, S, R]
    q_idx = idx[..., S - T:].repeat_interleave(H // Hk, dim=1)  # [B, H, T]
    cq, sq = rope_angles(q_idx, inv_freq)
    return _rotate(q, cq, sq, scaling), _rotate(k, ck, sk, scaling)
