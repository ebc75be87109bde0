"""Torch-backend attention: PyTorch's fused SDPA kernel with graphwright's position mask.

Same semantics as ``graphwright.capture.ops.attention_reference`` (tested against it); called
directly from the lowered graph, which skips the custom-op dispatcher (~0.2 ms per call on CPU,
30 calls per decode step for SmolLM2).

Prefill of a prompt without padding (positions 0..T-1, empty cache) calls SDPA with
``is_causal=True`` instead of a mask tensor: the same result, and the fused kernel skips the
blocks above the diagonal instead of reading a T x S mask (SmolLM2-135M prefill of 4,000 tokens:
14.9 s -> 9.6 s, ``python bench/bench_runtime.py --prompt 4000 --new 32 --repeats 2``).

Windowed decode (a ``window`` pass, StreamingLLM-style sinks, or a model's own sliding window):
a masked SDPA would still read every cached key, so a single decode query first gathers the
visible columns (at most ``window + sinks`` of them) and attends over those only. The gathered
columns keep their order and their mask, so the result equals the masked one (tested against
the reference and a per-query loop oracle).

Decode masks are built once per step: the layers of a step without per-layer positions pass the
same ``q_pos`` and ``k_pos`` tensor objects, so the last mask is kept (with those objects, compared
by identity) and reused; when every key is visible to every query (no padding, no window) SDPA
runs without a mask. One host read per step for that test (CPU only); both are skipped under
``torch.compile``. A decode step over per-head slots (eviction caches, ``k_pos`` [B, Hk, S]) runs SDPA
like a dense one (no mask when every slot is valid and visible: StreamingLLM and SnapKV after their
first steps), except in layers whose eviction op keeps a running score (H2O, FastGen): those are
lowered to ``attention_sdpa_scored``, which computes the probabilities explicitly
(``decode_probs.py``) so the score reuses them. Tested against the reference with and without padding.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ...capture.ops import visible_mask
from .decode_probs import attend_slots
from .step_memo import rows_full, step_info


def _plain_causal(q_pos, k_pos, T: int, S: int) -> bool:
    """A fresh prompt without padding: the mask is exactly SDPA's ``is_causal`` (top-left aligned)."""
    if T != S or T == 1 or k_pos.dim() != 2:
        return False
    ar = torch.arange(S, device=k_pos.device)
    return bool((k_pos == ar).all()) and bool((q_pos == ar).all())


def _shared_positions(k_pos):
    """k_pos [B, S] when every KV head holds the same positions (a fresh prompt, StreamingLLM), else as given.

    Per-head positions [B, Hk, S] otherwise make the mask per query head: for a prompt of T tokens,
    SDPA then converts a [B, H, T, T] boolean mask into a float one (SmolLM2, 8,192 tokens: 2.4 GB
    per layer, measured as a 3.5 GB peak for a StreamingLLM prefill against 1.0 GB dense).
    """
    if k_pos.dim() == 3 and (k_pos.shape[1] == 1 or bool((k_pos == k_pos[:, :1]).all())):
        return k_pos[:, 0]
    return k_pos


class _StepMask(threading.local):
    """Per thread (concurrent generations on one model): (q_pos, k_pos, window, sinks, mask or None
    when all keys are visible) of the last decode step's mask; held tensors cannot be freed, so the
    identity test cannot match a reused id."""
    entry: tuple = ()


_LAST_MASK = _StepMask()


def _step_mask(q_pos, k_pos, window: int, sinks: int):
    """visible_mask of a decode step, or None when every key is visible; reused while the same tensors come."""
    if torch.compiler.is_compiling() or q_pos.device.type != "cpu":  # no host reads off CPU or in a compiled graph
        return visible_mask(q_pos, k_pos, window, sinks)
    m = _LAST_MASK.entry
    if m and m[0] is q_pos and m[1] is k_pos and m[2] == window and m[3] == sinks:
        return m[4]
    if not window and not sinks and q_pos.shape[1] == 1 and _all_visible(q_pos, k_pos):
        _LAST_MASK.entry = (q_pos, k_pos, window, sinks, None)
        return None
    mask = visible_mask(q_pos, k_pos, window, sinks)
    full = None if bool(mask.all()) else mask  # the one host read per step
    _LAST_MASK.entry = (q_pos, k_pos, window, sinks, full)
    return full


def _all_visible(q_pos, k_pos) -> bool:
    """A single query per row sees every slot of ``k_pos`` (no window): every slot valid and none past the
    earliest query (a padding query, lifted past every position, sees every valid slot). One host read;
    False means "build the mask and look" (the eviction layers have a ``k_pos`` per layer, so the identity
    memo misses there and this replaces a mask build per layer)."""
    lift = step_info(q_pos).q_lift.view(-1)  # [B]
    return bool((k_pos.amin() >= 0) & (k_pos.reshape(lift.shape[0], -1).amax(dim=1) <= lift).all())


def _grouped_decode(q, k, v, scale, mask=None):
    """One decode query per head, GQA without expanding K/V: the g = H / Hk query heads of a KV head (query head h
    reads KV head h // g, as ``enable_gqa`` and HF's ``repeat_kv``) become g query rows of that KV head. SDPA's
    ``enable_gqa`` on CPU reads each KV head once per query head; this reads it once (idle, 2 threads, SmolLM2's
    9/3 heads x 64, an ad hoc microbenchmark: 0.52 -> 0.31 ms per layer at 4,096 keys, 1.18 -> 0.67 at
    8,192; same values within 1e-5).
    ``mask``: [B, Hk | 1, 1, S] boolean, broadcast over the g rows."""
    B, H, _, D = q.shape
    Hk = k.shape[1]
    if Hk == H:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = F.scaled_dot_product_attention(q.reshape(B, Hk, H // Hk, D), k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, H, 1, v.shape[-1])


def attention_sdpa(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, sinks=0):
    B, H, T, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if T > 1 and key_bias is None:
        k_pos = _shared_positions(k_pos)  # one check per prompt step; decode masks are [B, H, 1, S] anyway
    if not window and not sinks and key_bias is None and _plain_causal(q_pos, k_pos, T, S):
        # no mask tensor: the fused kernel skips the blocks above the diagonal (prefill ~2x less work)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hk != H)
    if T == 1:
        mask = _step_mask(q_pos, k_pos, window, sinks)
        if mask is None and key_bias is None:  # every key visible: no mask at all
            return _grouped_decode(q, k, v, scale)
        if mask is None:
            mask = torch.ones(B, 1, 1, 1, S, dtype=torch.bool, device=q.device)
    else:
        mask = visible_mask(q_pos, k_pos, window, sinks)  # [B, Hk|1, 1, T, S]
    if window > 0 and T == 1 and key_bias is None and mask.shape[1] == 1 and S > 2 * (window + sinks):
        return _windowed_decode(q, k, v, mask[:, 0, 0, 0], scale, window + sinks)
    if T == 1 and key_bias is None:  # [B, Hk | 1, 1, S]: one mask row per KV head, shared by its query heads
        return _grouped_decode(q, k, v, scale, mask[:, :, 0, 0][:, :, None] if mask.dim() == 5 else mask)
    mask = mask[:, :, 0] if mask.shape[1] == 1 else mask.expand(B, Hk, H // Hk, T, S).reshape(B, H, T, S)
    if key_bias is not None:
        # additive float mask: the per-(head, key) bias broadcast over query rows
        neg = torch.finfo(torch.float32).min
        mask = torch.where(mask, key_bias.float()[:, :, None, :], neg).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hk != H)


def attention_sdpa_scored(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, sinks=0, full_at: int = 0):
    """``attention_sdpa`` for a layer whose eviction op adds the step's attention to a running score (H2O,
    FastGen; chosen at lowering by ``codegen/torch/scored_attention.py``): a decode step over per-head
    slots computes its probabilities explicitly (``decode_probs.attend_slots``) and keeps them for that op.

    ``full_at``: the layer's H2O token-count budget c (0: none). A step with c + 1 slots after every row
    has held c tokens has every slot valid and visible (the cache entering it is the kept set, c per
    head), so it builds no mask (``step_memo.rows_full``: one memoised host read per step, CPU only)."""
    if q.shape[2] == 1 and k_pos.dim() == 3 and not window and not sinks:
        full = full_at > 0 and k_pos.shape[2] == full_at + 1 and rows_full(step_info(q_pos), full_at)
        return attend_slots(q, k, v, q_pos, k_pos, scale, key_bias, full)
    return attention_sdpa(q, k, v, q_pos, k_pos, scale, window, key_bias, sinks)


def _windowed_decode(q, k, v, visible, scale, width: int):
    """One query per row over its visible columns only: ``visible`` [B, S] has <= ``width`` Trues."""
    B, S = visible.shape
    # the visible columns first, in cache order (stable sort of the 0/1 mask, descending)
    cols = torch.sort(visible.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :width]
    if B == 1:
        ks, vs = k.index_select(2, cols[0]), v.index_select(2, cols[0])
    else:
        idx = cols[:, None, :, None]
        ks = k.gather(2, idx.expand(B, k.shape[1], width, k.shape[3]))
        vs = v.gather(2, idx.expand(B, v.shape[1], width, v.shape[3]))
    sub = visible.gather(1, cols)[:, None, None, :]  # [B, 1, 1, width]: rows with fewer visible keys
    return F.scaled_dot_product_attention(q, ks, vs, attn_mask=sub, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
