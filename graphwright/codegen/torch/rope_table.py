"""Rotary cos/sin for cached keys from a table built once, instead of cos/sin of every position per step.

``graphwright.ops.latent_attention.rope_keys`` (the reference) evaluates ``cos`` and ``sin`` of
``k_pos * inv_freq`` for all S cached positions in every layer at every step. Here:

* one fp32 table per rotary setting (``inv_freq`` values, ``rope_scaling``): rows ``p = 0..N-1``
  hold ``cos(p * inv_freq) * scaling`` and ``sin(...) * scaling``, computed with the same fp32
  product as the reference (equal up to the last ulp of the vectorised cos/sin); N doubles
  when a larger position comes;
* the rows for one step's ``k_pos`` are gathered once and reused by the following layers while
  their ``k_pos`` is equal (the model-wide ``key_positions`` state is the same for all layers of a
  step): the memo keeps a copy of the last ``k_pos`` and compares values (S int64 reads, ~1/16
  of the gather's bytes), since inference tensors carry no in-place version counter.

Padding slots (``k_pos = -1``) read row 0, as the reference rotates them as position 0.
"""

from __future__ import annotations

import torch

_TABLES: dict = {}  # setting -> (cos [N, R/2], sin [N, R/2])
_MEMO: dict = {}  # setting -> (copy of the last k_pos, cos, sin)
_SETTINGS: dict = {}  # id(inv_freq) -> (inv_freq, setting): one .tolist() per constant
_MIN_ROWS = 4096


def _setting(inv_freq: torch.Tensor, scaling: float) -> tuple:
    """(device, inv_freq values, scaling): two layers with equal rotary settings share a table."""
    hit = _SETTINGS.get(id(inv_freq))
    if hit is not None and hit[0] is inv_freq and hit[1][2] == float(scaling):
        return hit[1]
    setting = (inv_freq.device, tuple(inv_freq.float().tolist()), float(scaling))
    if len(_SETTINGS) > 256:  # tensors made per call (tests): drop the held references
        _SETTINGS.clear()
    _SETTINGS[id(inv_freq)] = (inv_freq, setting)
    return setting


def _table(setting: tuple, rows: int):
    hit = _TABLES.get(setting)
    if hit is not None and hit[0].shape[0] >= rows:
        return hit
    n = max(_MIN_ROWS, 1 << (max(rows, 1) - 1).bit_length())
    # a plain tensor whatever the caller's mode: a table built under inference_mode must still serve a later
    # step run with autograd on (an inference tensor cannot be saved for backward)
    with torch.inference_mode(False), torch.no_grad():
        f = torch.tensor(setting[1], dtype=torch.float32, device=setting[0])
        ang = torch.arange(n, device=f.device).float()[:, None] * f  # the reference's fp32 product
        _TABLES[setting] = (ang.cos() * setting[2], ang.sin() * setting[2])
    return _TABLES[setting]


def rope_cos_sin(k_pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """cos, sin [*k_pos.shape, R/2] in fp32 for positions ``k_pos`` (-1 reads position 0).

    Under ``torch.compile`` (the ``compiled`` backend) the table and memo are host-side state
    (``tolist``, ``int(max)``, value comparisons) that would break the graph and recompile every
    step, so the angles are computed in the graph instead, where Inductor fuses them.
    """
    if torch.compiler.is_compiling():
        ang = k_pos.clamp(min=0).float()[..., None] * inv_freq.float()
        return ang.cos() * scaling, ang.sin() * scaling
    setting = _setting(inv_freq, scaling)
    memo = _MEMO.get(setting)  # memo[3]: made under inference_mode; its rows are not reused outside it
    if (memo is not None and memo[3] == torch.is_inference_mode_enabled() and memo[0].shape == k_pos.shape
            and torch.equal(memo[0], k_pos)):
        return memo[1], memo[2]
    idx = k_pos.clamp(min=0).reshape(-1)
    top = int(idx.max()) + 1 if idx.numel() else 1
    cos_t, sin_t = _table(setting, top)
    shape = (*k_pos.shape, cos_t.shape[1])
    cos, sin = cos_t.index_select(0, idx).view(shape), sin_t.index_select(0, idx).view(shape)
    _MEMO[setting] = (k_pos.clone(), cos, sin, torch.is_inference_mode_enabled())
    return cos, sin


def rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` on the first R = 2 * cos.shape[-1] dims of ``x`` (the rest unchanged).

    ``cos``/``sin``: half-width rows [..., R/2] broadcastable to ``x[..., :R/2]`` (from ``rope_cos_sin``).
    fp32 arithmetic: ``inplace`` rotates ``x`` itself (it must be fp32 and not needed unrotated);
    otherwise an fp32 copy is rotated and returned in ``x``'s dtype. The one rotation of cached keys
    (``eviction_slots.rope_cache_index_ranked``, ``latent_attention.rebuild_keys_fast``).
    """
    h = cos.shape[-1]
    y = x if inplace else x.to(torch.float32, copy=True)
    x1, x2 = y[..., :h], y[..., h:2 * h]
    x2_sin = x2 * sin
    x1_sin = x1 * sin
    x1.mul_(cos).sub_(x2_sin)  # [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]
    x2.mul_(cos).add_(x1_sin)
    return y if inplace or x.dtype == torch.float32 else y.to(x.dtype)


def clear():
    """Drop the tables and memos (tests; frees the memo's reference to the last k_pos)."""
    _TABLES.clear()
    _MEMO.clear()
    _SETTINGS.clear()
