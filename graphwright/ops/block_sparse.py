"""``graphwright.block_sparse_attention``: attention over the top-k key blocks of each query.

Based on Quest (arXiv:2406.10774, ``evaluation/quest_attention.py``) and MoBA (arXiv:2502.13189,
``moba/moba_naive.py::moba_attn_varlen_naive``). Same leading arguments as
``graphwright.attention`` plus ``(block, top_k, mode, prefill)``::

    block_sparse_attention(q [B, H, T, D], k [B, Hk, S, D], v [B, Hk, S, Dv], q_pos [B, T], k_pos [B, S],
                           scale, block, top_k, mode, prefill) -> [B, H, T, Dv]

Keys are grouped into blocks ("pages") by absolute position: block c holds positions
[c * block, (c + 1) * block), so left padding (k_pos = -1) never joins a block. Per query row and
KV head (GQA: the block score is the mean over the g query heads of the group) the op scores
every *candidate* block (it holds at least one key and starts at or before the query position),
keeps the ``top_k`` best, and runs one exact softmax over the visible keys of the kept blocks:

* ``quest``: page bound U_c = sum_d max(q_d m_d, q_d M_d) with m, M the elementwise min / max of
  the page's keys (U_c >= q . k for every key k in the page).
* ``moba``: gate s_c = q . mean(K_c); the query's own block is always kept (causal inside it),
  future blocks never are.

A step with T > 1 (prefill) is dense unless ``prefill`` is True (MoBA only; Quest keeps full
prefill as in the paper). When a row has at most ``top_k`` candidate blocks every block is kept
and the result equals dense causal attention (the exact setting: top_k >= number of blocks).
The cache is unchanged: the saving is the keys and values read per decode step.

Optional ``page_a`` / ``page_b`` are the page statistics kept as cache state by the
``block_sparse`` pass (``graphwright.page_summary``; Quest: min and max, MoBA: mean in
``page_a``), [B, Hk, >= ceil(S / block), D] fp32; they must equal the statistics of ``k`` (the
pass guarantees it), so the result is the same as without them, and a decode step no longer
reads every key to choose its blocks. Without them the statistics are recomputed from ``k``.
"""

from __future__ import annotations

import torch

from ..capture.ops import attention_reference, visible_mask

_LIB = "graphwright"
MODES = ("quest", "moba")


def block_ids(k_pos: torch.Tensor, block: int) -> torch.Tensor:
    """[B, S] block index of each key (-1 for empty / padding slots)."""
    return torch.where(k_pos >= 0, torch.div(k_pos, block, rounding_mode="floor"), torch.full_like(k_pos, -1))


def _aligned(k_pos: torch.Tensor) -> bool:
    """True when column j holds position j in every row (no padding): blocks are column slices."""
    return bool((k_pos == torch.arange(k_pos.shape[1], device=k_pos.device)).all())


def page_stats(k: torch.Tensor, k_pos: torch.Tensor, block: int, nb: int, stat: str) -> torch.Tensor:
    """Per block fp32 ``min``, ``max`` or ``mean`` of the keys: [B, Hk, NB, D] (0 for empty blocks)."""
    B, Hk, S, D = k.shape
    kf = k.float()
    if _aligned(k_pos):  # fast path: full blocks are a view of the cache, the partial tail block is separate
        full = S // block
        reduce = {"min": lambda x, d: x.amin(d), "max": lambda x, d: x.amax(d), "mean": lambda x, d: x.mean(d)}[stat]
        parts = [reduce(kf[:, :, :full * block].view(B, Hk, full, block, D), 3)] if full else []
        if S > full * block:
            parts.append(reduce(kf[:, :, full * block:], 2)[:, :, None])
        return torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    blk = block_ids(k_pos, block)
    idx = torch.where(blk >= 0, blk, nb)[:, None, :, None].expand(B, Hk, S, D)  # padding -> dummy block nb
    if stat == "mean":
        sums = kf.new_zeros(B, Hk, nb + 1, D).scatter_add_(2, idx, kf)
        counts = kf.new_zeros(B, nb + 1).scatter_add_(1, idx[:, 0, :, 0], torch.ones_like(k_pos, dtype=kf.dtype))
        return (sums / counts.clamp(min=1)[:, None, :, None])[:, :, :nb]
    init = float("inf") if stat == "min" else float("-inf")
    out = kf.new_full((B, Hk, nb + 1, D), init).scatter_reduce_(2, idx, kf, "amin" if stat == "min" else "amax")
    out = out[:, :, :nb]
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def quest_upper_bound(q: torch.Tensor, pmin: torch.Tensor, pmax: torch.Tensor) -> torch.Tensor:
    """U [B, Hk, g, T, NB] = sum_d max(q_d m_d, q_d M_d) >= max over the page of q . k (unscaled)."""
    B, H, T, D = q.shape
    Hk = pmin.shape[1]
    qg = q.float().view(B, Hk, H // Hk, T, 1, D)
    return torch.maximum(qg * pmin[:, :, None, None], qg * pmax[:, :, None, None]).sum(-1)


def num_pages(cache_len: int, block: int) -> int:
    """Pages of ``block`` keys that cover a cache of ``cache_len`` columns: ceil(cache_len / block)."""
    return -(-cache_len // block)


def num_blocks(k_pos: torch.Tensor, block: int) -> int:
    return int(k_pos.max().clamp(min=-1)) // block + 1 if k_pos.numel() else 0


def select_blocks(q, k, q_pos, k_pos, block: int, top_k: int, mode: str, pages=None):
    """Kept blocks per (row, KV head, query): ``(top [B, Hk, T, kk] block ids, ok [B, Hk, T, kk], nb)``.

    ``ok`` is False where fewer than ``kk = min(top_k, nb)`` blocks were candidates. ``pages``:
    the page statistics kept as cache state (``graphwright.page_summary``: Quest ``(min, max)``,
    MoBA ``(mean,)``, [B, Hk, >= nb, D]); None recomputes them from ``k``.
    """
    B, H, T, D = q.shape
    Hk = k.shape[1]
    nb = num_blocks(k_pos, block)
    blk = block_ids(k_pos, block)
    present = torch.zeros(B, nb + 1, dtype=torch.bool, device=k.device)
    present.scatter_(1, torch.where(blk >= 0, blk, nb), True)
    present = present[:, :nb]
    ar = torch.arange(nb, device=k.device)
    qblk = torch.where(q_pos >= 0, torch.div(q_pos, block, rounding_mode="floor"), torch.full_like(q_pos, nb))
    cand = present[:, None, :] & (ar <= qblk[..., None])  # [B, T, NB]: padding queries see every block
    if pages is not None:
        pages = [p[:, :, :nb] for p in pages]
    if mode == "quest":
        pmin, pmax = pages if pages is not None else (page_stats(k, k_pos, block, nb, s) for s in ("min", "max"))
        score = quest_upper_bound(q, pmin, pmax).mean(2)
    elif mode == "moba":
        mean = pages[0] if pages is not None else page_stats(k, k_pos, block, nb, "mean")
        qg = q.float().view(B, Hk, H // Hk, T, D)
        score = torch.matmul(qg, mean[:, :, None].transpose(-1, -2)).mean(2)  # [B, Hk, T, NB]
        score = score.masked_fill((ar == qblk[..., None])[:, None], float("inf"))  # own block forced
    else:
        raise ValueError(f"block_sparse mode must be one of {MODES}; got {mode!r}")
    score = score.masked_fill(~cand[:, None], float("-inf"))
    kk = min(top_k, nb)
    val, top = score.topk(kk, dim=-1)
    return top, val > float("-inf"), nb


def block_mask(q_pos, k_pos, top, ok, block: int) -> torch.Tensor:
    """Boolean [B, Hk, 1, T, S]: visible keys that lie in a kept block."""
    B, Hk, T, _ = top.shape
    S = k_pos.shape[1]
    blk = block_ids(k_pos, block)  # [B, S]
    nb = int(top.max()) + 1 if top.numel() else 0
    sel = torch.zeros(B, Hk, T, nb + 1, dtype=torch.bool, device=top.device)
    sel.scatter_(-1, torch.where(ok, top, nb), True)
    sel[..., nb] = False  # the dummy slot: unused picks and padding keys
    idx = torch.where(blk >= 0, blk.clamp(max=nb), nb)[:, None, None, :].expand(B, Hk, T, S)
    return visible_mask(q_pos, k_pos) & sel.gather(-1, idx)[:, :, None]


def _aligned_decode(q, k, q_pos, k_pos, block: int, top_k: int, mode: str, pages):
    """``decode_columns`` for the common layout, in a few ops: no padding (column j holds position
    j in every row) and the query is the newest key. Blocks are then column slices, every block
    is a candidate, and the query's own block is the last one. None when the layout differs."""
    S = k.shape[2]
    if not _aligned(k_pos) or not bool((q_pos == S - 1).all()):
        return None
    nb = num_pages(S, block)
    if nb <= top_k:
        return "dense"
    B, H, _, D = q.shape
    Hk = k.shape[1]
    if pages is None:
        pages = tuple(page_stats(k, k_pos, block, nb, s) for s in (("min", "max") if mode == "quest" else ("mean",)))
    pages = [p[:, :, :nb] for p in pages]
    if mode == "quest":
        score = quest_upper_bound(q, *pages).mean(2)[:, :, 0]  # [B, Hk, NB]
    else:
        score = torch.matmul(q.float().view(B, Hk, H // Hk, D), pages[0].transpose(-1, -2)).mean(2)
        score[..., nb - 1] = float("inf")  # own block forced
    top = score.topk(top_k, dim=-1).indices  # [B, Hk, top_k]
    cols = (top[..., None] * block + torch.arange(block, device=q.device)).view(B, Hk, top_k * block)
    keep = cols < S  # only the last (partial) block can run past the cache
    return cols.clamp_(max=S - 1), keep


def decode_columns(q, k, q_pos, k_pos, block: int, top_k: int, mode: str, pages=None):
    """The cache columns one decode query per KV head reads, for the gathering kernels.

    Returns ``"dense"`` (every candidate block is kept: plain causal attention), ``"reference"``
    (a layout the gather does not handle: several queries, per-head positions, or blocks that are
    not contiguous in the cache) or ``(cols, keep)``: ``cols`` [B, Hk, top_k * block] column
    indices of the kept blocks (clamped into the cache) and ``keep`` [B, Hk, top_k * block] which
    of them belong to a kept block (causality and padding are left to the caller).
    """
    B, Hk, S = k.shape[0], k.shape[1], k.shape[2]
    if q.shape[2] != 1 or k_pos.dim() != 2:
        return "reference"
    fast = _aligned_decode(q, k, q_pos, k_pos, block, top_k, mode, pages)
    if fast is not None:
        return fast
    blk = block_ids(k_pos, block)  # [B, S], nondecreasing for the runtime's left-padded cache
    if bool((blk[:, 1:] < blk[:, :-1]).any()):
        return "reference"
    top, ok, nb = select_blocks(q, k, q_pos, k_pos, block, top_k, mode, pages)  # [B, Hk, 1, kk]
    if nb <= top_k:
        return "dense"
    kk = top.shape[-1]
    # first column of each kept block, then `block` consecutive columns (blocks are contiguous)
    starts = torch.searchsorted(blk.contiguous(), top.reshape(B, Hk * kk)).view(B, Hk, kk, 1)
    cols = starts + torch.arange(block, device=q.device)  # [B, Hk, kk, block]
    inside = cols < S
    cols = cols.clamp(max=S - 1).view(B, Hk, kk * block)
    per_col = lambda t: t.reshape(B, Hk, kk, 1).expand(-1, -1, -1, block).reshape(B, Hk, -1)  # noqa: E731
    same = blk[:, None, :].expand(B, Hk, S).gather(2, cols) == per_col(top)
    return cols, inside.view(B, Hk, -1) & same & per_col(ok)


def page_inputs(mode: str, page_a, page_b):
    """The page-statistics state passed to the op, as ``select_blocks`` takes it (None: recompute)."""
    if page_a is None:
        return None
    return (page_a, page_b) if mode == "quest" else (page_a,)


def block_sparse_reference(q, k, v, q_pos, k_pos, scale: float, block: int, top_k: int, mode: str,
                           prefill: bool = False, page_a=None, page_b=None) -> torch.Tensor:
    """The definition (see module docstring): dense math under the kept-block mask, fp32 softmax."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if T > 1 and not prefill:
        return attention_reference(q, k, v, q_pos, k_pos, scale)
    top, ok, _ = select_blocks(q, k, q_pos, k_pos, block, top_k, mode, page_inputs(mode, page_a, page_b))
    mask = block_mask(q_pos, k_pos, top, ok, block)  # [B, Hk, 1, T, S]
    g = H // Hk
    qg = q.reshape(B, Hk, g * T, D).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)).view(B, Hk, g, T, S) * scale
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).view(B, Hk, g * T, S)
    return torch.matmul(probs, v.float()).reshape(B, H, T, v.shape[-1]).to(v.dtype)


def check_block_sparse_args(q, k, v, q_pos, k_pos, block, top_k, mode, prefill, page_a=None, page_b=None):
    from ..capture.ops import _check_attention_args

    _check_attention_args(q, k, v, q_pos, k_pos)
    if k_pos.dim() != 2:
        raise ValueError(f"block_sparse_attention needs shared key positions [B, S]; got {list(k_pos.shape)} "
                         "(per-head caches from eviction passes are not supported)")
    if block < 1 or top_k < 1:
        raise ValueError(f"block ({block}) and top_k ({top_k}) must be >= 1")
    if mode not in MODES:
        raise ValueError(f"block_sparse mode must be one of {MODES}; got {mode!r}")
    if prefill and mode != "moba":
        raise ValueError("sparse prefill is defined for mode='moba' only (Quest keeps full prefill)")
    if (mode == "quest" and (page_a is None) != (page_b is None)) or (mode == "moba" and page_b is not None):
        raise ValueError("page statistics: Quest takes page_a = min and page_b = max (both or neither), "
                         "MoBA takes page_a = mean only")
    pages_needed = num_pages(k.shape[2], block)
    for p in (page_a, page_b):
        if p is not None and (p.dim() != 4 or p.shape[:2] != k.shape[:2] or p.shape[3] != k.shape[3]
                              or p.shape[2] < pages_needed):
            raise ValueError(f"page statistics must be [B, Hk, >= {pages_needed}, D] = [{k.shape[0]}, {k.shape[1]}, "
                             f">= {pages_needed}, {k.shape[3]}]; got {list(p.shape)}")


@torch.library.custom_op(f"{_LIB}::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                           scale: float, block: int, top_k: int, mode: str, prefill: bool = False,
                           page_a: torch.Tensor | None = None, page_b: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k block attention; the torch implementation is the reference."""
    check_block_sparse_args(q, k, v, q_pos, k_pos, block, top_k, mode, prefill, page_a, page_b)
    return block_sparse_reference(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill, page_a, page_b)


@block_sparse_attention.register_fake
def _(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill=False, page_a=None, page_b=None):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), dtype=v.dtype)


BLOCK_SPARSE_ATTENTION = torch.ops.graphwright.block_sparse_attention.default
