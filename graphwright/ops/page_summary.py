"""``graphwright.page_summary``: per-page key statistics kept as cache state for block-sparse decode.

Quest (arXiv:2406.10774, section 3.2) keeps, for every KV-cache page, the elementwise min and max
of the page's keys next to the cache and updates them as tokens arrive, so a decode step reads
only these summaries (1/block of the keys, twice) to pick its pages. MoBA (arXiv:2502.13189)
gates blocks by their mean key. This op is that state update::

    page_summary(k [B, Hk, S, D], k_pos [B, S], q_pos [B, T], prev [B, Hk, P, D], block, stat)
        -> [B, Hk, ceil(S / block), D] fp32

``k`` / ``k_pos`` are the layer's whole cache after this step's append (the last T columns are
the new tokens at positions ``q_pos``), ``prev`` the summaries the previous step returned, ``stat``
one of ``min`` / ``max`` / ``mean``. Page c summarises the keys at positions [c * block,
(c + 1) * block) (by position, so left padding never joins a page); pages without keys are 0.
The page axis is ceil(S / block) long, which covers every page because the runtime's positions
never exceed the cache column (left padding only lowers them).

Semantics: the result equals ``page_stats(k, k_pos, block, ceil(S / block), stat)`` (the whole
cache recomputed; bit-equal for min / max, fp32 rounding for mean). Implementation: a one-token
decode step after a non-empty ``prev`` recomputes only the page of the new token, from the last
``block`` columns of the cache (that page is the tail of every row because positions increase),
and copies every other page from ``prev``; any other step (prefill, chunks of several tokens, a
first step) recomputes all pages.
"""

from __future__ import annotations

import torch

from .block_sparse import _aligned, block_ids, num_pages, page_stats

STATS = ("min", "max", "mean")


def _tail_page(k, k_pos, q_pos, block: int, stat: str):
    """(page index [B], statistic [B, Hk, D]) of the page holding each row's newest token."""
    S = k.shape[2]
    w = min(block, S)
    page = torch.div(q_pos[:, -1], block, rounding_mode="floor")  # [B]
    member = block_ids(k_pos[:, S - w:], block) == page[:, None]  # [B, w]
    tail = k[:, :, S - w:].float()  # [B, Hk, w, D]
    m = member[:, None, :, None]
    if stat == "min":
        val = torch.where(m, tail, float("inf")).amin(2)
    elif stat == "max":
        val = torch.where(m, tail, float("-inf")).amax(2)
    else:
        val = torch.where(m, tail, 0.0).sum(2) / member.sum(1).clamp(min=1)[:, None, None].to(tail.dtype)
    return page, val


def page_summary_reference(k, k_pos, q_pos, prev, block: int, stat: str) -> torch.Tensor:
    """The definition: every page recomputed from the whole cache."""
    return page_stats(k, k_pos, block, num_pages(k.shape[2], block), stat)


def page_summary_incremental(k, k_pos, q_pos, prev, block: int, stat: str) -> torch.Tensor:
    """The update a decode step needs: only the newest token's page is recomputed."""
    B, Hk, S, D = k.shape
    n = num_pages(S, block)
    if q_pos.shape[1] != 1 or prev.shape[2] == 0 or prev.shape[2] > n or bool((q_pos < 0).any()):
        return page_summary_reference(k, k_pos, q_pos, prev, block, stat)
    out = torch.cat([prev, prev.new_zeros(B, Hk, n - prev.shape[2], D)], 2)  # a copy: prev stays as it was
    if _aligned(k_pos) and bool((q_pos == S - 1).all()):  # no padding: the page is the cache's last columns
        tail = k[:, :, (n - 1) * block:].float()
        out[:, :, n - 1] = {"min": tail.amin, "max": tail.amax, "mean": tail.mean}[stat](2)
        return out
    page, val = _tail_page(k, k_pos, q_pos, block, stat)
    out.scatter_(2, page.view(B, 1, 1, 1).expand(B, Hk, 1, D), val[:, :, None])
    return out


def check_page_summary_args(k, k_pos, q_pos, prev, block, stat):
    if k.dim() != 4 or k_pos.dim() != 2 or q_pos.dim() != 2 or prev.dim() != 4:
        raise ValueError(f"page_summary wants k [B, Hk, S, D], k_pos [B, S], q_pos [B, T], prev [B, Hk, P, D]; got "
                         f"{list(k.shape)}, {list(k_pos.shape)}, {list(q_pos.shape)}, {list(prev.shape)}")
    if block < 1:
        raise ValueError(f"page_summary block must be >= 1; got {block}")
    if stat not in STATS:
        raise ValueError(f"page_summary stat must be one of {STATS}; got {stat!r}")


@torch.library.custom_op("graphwright::page_summary", mutates_args=())
def page_summary(k: torch.Tensor, k_pos: torch.Tensor, q_pos: torch.Tensor, prev: torch.Tensor, block: int,
                 stat: str) -> torch.Tensor:
    """Per-page key min / max / mean [B, Hk, ceil(S / block), D] fp32; see the module docstring."""
    check_page_summary_args(k, k_pos, q_pos, prev, block, stat)
    return page_summary_reference(k, k_pos, q_pos, prev, block, stat)


@page_summary.register_fake
def _(k, k_pos, q_pos, prev, block, stat):
    return k.new_empty((k.shape[0], k.shape[1], (k.shape[2] + block - 1) // block, k.shape[3]), dtype=torch.float32)


PAGE_SUMMARY = torch.ops.graphwright.page_summary.default
