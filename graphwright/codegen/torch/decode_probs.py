"""One decode query per row over per-head slots: softmax probabilities computed once per layer and step.

H2O and FastGen add each step's attention to a running score (``eviction_slots.decode_colsum``),
so on slots a decode step used to compute the same [g, D] x [D, S] scores twice: in SDPA for the
output and again for the score. The torch backend's attention on per-head slot caches
(``k_pos`` [B, Hk, S]) at T = 1 now computes the probabilities here, returns ``P @ v`` as the
output, and keeps P (with the tensors it was computed from, compared by identity) for the
eviction op of the same layer, which takes it instead of recomputing. The math is the
eviction's (fp32 scores, ``finfo.min`` mask, fp32 softmax: ``attention_reference``'s), so the
running scores and kept sets are bit-identical to computing them twice.

Nothing is kept under ``torch.compile``. Tested: attention output against the reference (empty
slots, batch 2 left-padded), kept sets and logits of H2O/FastGen on slots against the references
(``tests/passes/test_eviction_slots.py``).
"""

from __future__ import annotations

import threading

import torch

from .step_memo import step_info


class _LastProbs(threading.local):
    """Per thread (concurrent generations on one model): (q, k, q_pos, k_pos, key_bias, scale, P) of
    the last layer's probabilities, taken once by ``step_probs``."""
    entry: tuple = ()


_LAST = _LastProbs()


def slot_probs(q, k, q_pos, k_pos, scale, key_bias=None, all_visible: bool = False) -> torch.Tensor:
    """[B, Hk, g, S] fp32 softmax of each query head's scores over its KV head's slots (T = 1).

    ``all_visible``: the caller knows every slot is valid and no later than the query (an H2O layer
    with a token-count budget once every row is full: ``attention_sdpa_scored``), so no mask is built
    (the ``where`` would keep every score as it is: same values)."""
    B, H, _, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    # one bmm over the B * Hk heads (the cache view folds its two leading dims without a copy); the scale is
    # out of place: an in-place mul_ makes the ONNX exporter retrace the whole decode program (decompositions)
    s = torch.bmm(_f32(q).reshape(B * Hk, g, D), _f32(k).flatten(0, 1).transpose(1, 2)).view(B, Hk, g, S) * scale
    if key_bias is not None:
        s = s + key_bias.float().view(B, Hk, g, S)
    if all_visible:
        return torch.softmax(s, dim=-1)
    # visible: a valid slot at or before the query; a padding query (-1) sees every valid slot (q_lift)
    visible = (k_pos >= 0) & (k_pos <= step_info(q_pos).q_lift)
    return torch.softmax(torch.where(visible[:, :, None], s, torch.finfo(torch.float32).min), dim=-1)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def attend_slots(q, k, v, q_pos, k_pos, scale, key_bias=None, all_visible: bool = False) -> torch.Tensor:
    """Attention output [B, H, 1, Dv] from ``slot_probs``; the probabilities are kept for ``step_probs``."""
    B, H = q.shape[:2]
    p = slot_probs(q, k, q_pos, k_pos, scale, key_bias, all_visible)
    if not torch.compiler.is_compiling():
        _LAST.entry = (q, k, q_pos, k_pos, key_bias, scale, p)
    out = torch.bmm(p.view(-1, *p.shape[2:]), _f32(v).flatten(0, 1))  # [B * Hk, g, Dv]
    out = out.view(B, H, 1, v.shape[-1])
    return out if out.dtype == v.dtype else out.to(v.dtype)


def step_probs(q, k, q_pos, k_pos, scale, key_bias=None) -> torch.Tensor:
    """``slot_probs``, taken from the attention of the same layer when it ran on these very tensors."""
    m = _LAST.entry
    if m and m[0] is q and m[1] is k and m[2] is q_pos and m[3] is k_pos and m[4] is key_bias and m[5] == scale:
        _LAST.entry = ()
        return m[6]
    return slot_probs(q, k, q_pos, k_pos, scale, key_bias)
