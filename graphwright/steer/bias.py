"""The graph side of steering: per-head key bias from per-position weights.

PASTA (arXiv 2311.02262) adds ``log(alpha)`` to the pre-softmax scores of selected heads on the
prompt columns a user did *not* emphasize. graphwright expresses that without a T x S mask:

    key_bias[b, h, s] = coef[h] * weights[b, k_pos[b, s]]

* ``coef`` [H] is a per-layer graph buffer: ``log(alpha)`` on steered heads, 0 elsewhere (so
  unsteered heads get an exact 0 and their probabilities are bit-identical to the base);
* ``weights`` [B, P] is the one extra graph input (``STEER_INPUT``): for each row and each
  *absolute prompt position* ``p < P`` how many ``log(alpha)`` that position receives (built by
  ``graphwright.steer.emphasis``). Indexing by position, not cache column, is what makes it
  step-invariant: generated tokens have positions ``>= prompt length`` and get 0, padding keys
  (``k_pos = -1``) get 0 and are masked anyway, and KV-evicting passes keep working.

``weights is None`` (no emphasis given) returns ``None``, so the attention op runs exactly its
unbiased path: a steered model without emphasis *is* the base model, bit for bit.

This is a plain function called from the graph (not a custom op) precisely so it can return
``None``; everything it does is ordinary traceable torch.
"""

from __future__ import annotations

import torch

STEER_INPUT = "steer_weights"


def steer_key_bias(weights, k_pos: torch.Tensor, coef: torch.Tensor):
    """[B, H, S] key bias (or None when ``weights`` is None).

    ``k_pos``: the layer's key positions, [B, S] or [B, H_kv, S] for per-head caches.
    """
    if weights is None:
        return None
    B, P = weights.shape
    H = coef.shape[0]
    w = weights.to(torch.float32)
    valid = (k_pos >= 0) & (k_pos < P)
    idx = k_pos.clamp(0, max(P - 1, 0))
    if k_pos.dim() == 2:
        cols = torch.where(valid, torch.gather(w, 1, idx), 0.0)[:, None, :]  # [B, 1, S]
    else:
        hk = k_pos.shape[1]
        cols = torch.gather(w[:, None, :].expand(B, hk, P), 2, idx)
        cols = torch.where(valid, cols, 0.0).repeat_interleave(H // hk, dim=1)  # [B, H, S]
    return coef.to(torch.float32)[None, :, None] * cols
