"""Torch-backend cache append: ``cat([cache, new], dim)`` in place, into a buffer with spare capacity.

The step graph is functional: each step takes the cache as an input and returns
``cat([cache, new], dim)``. Run literally, that copies the whole cache of every layer at every
decode step, a cost that grows with the context (on SmolLM2-135M after a 4k-token prompt, decode
is 1.08x faster without it: 76.5 vs 82.7 ms per token, median of 4 alternating runs of
``python bench/bench_cache_append.py --repeats 4``; same tokens). The torch backend therefore
lowers every such ``cat`` whose first operand is a state input to ``cache_append``, which returns
the same values without the copy, like a preallocated KV cache:

* the result is a view of the first ``S + T`` entries (along ``dim``) of a buffer that has room
  for more; the new entries are written once, after the old ones;
* a later step that appends to that view, while it is still the buffer's newest view, writes in
  place again; when the room runs out the buffer is regrown geometrically (x1.25 + 64 entries),
  so the copying is amortised O(1) per token;
* anything else (a cache this function did not make, e.g. an eviction pass's compacted cache, or
  a second continuation from an older view of the same buffer) is copied into a fresh buffer,
  so a view a caller still holds never changes: writes only ever go past its end.

Eviction on slots (``eviction_slots.py``) is the one exception to "writes only go past the
end": at a decode step it moves the new token into an evicted token's slot *inside* the cache and
hands back the first S entries with ``keep_prefix`` (still the buffer's newest view, so the next
append is in place again). The state a step reads is therefore donated to that step: a caller
must not run two continuations from one evicted state (the runtime threads states linearly).

State accounting (``kv_bytes``) counts the views' elements; the spare room of each buffer is at
most a quarter of it plus 64 entries. The reference backend keeps the plain ``cat`` (the oracle).
"""

from __future__ import annotations

import torch

_GROWTH, _SLACK = 1.25, 64


def _capacity(n: int) -> int:
    return int(n * _GROWTH) + _SLACK


def _view(buf: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """The first ``n`` entries of ``buf``, marked as its newest view (the view keeps ``buf``
    alive; inference-mode views do not record their base, so the link is kept here)."""
    buf._graphwright_filled = n
    out = buf.narrow(dim, 0, n)
    out._graphwright_buffer = buf
    return out


def _fresh(cache: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    S, T = cache.shape[dim], new.shape[dim]
    shape = list(new.shape)
    shape[dim] = _capacity(S + T)
    buf = new.new_empty(shape)
    buf.narrow(dim, 0, S).copy_(cache)
    buf.narrow(dim, S, T).copy_(new)
    return _view(buf, dim, S + T)


def _owned_tail(cache: torch.Tensor, dim: int):
    """The buffer ``cache`` is the newest view of, when it can take an in-place append."""
    buf = getattr(cache, "_graphwright_buffer", None)
    if buf is None or getattr(buf, "_graphwright_filled", None) != cache.shape[dim]:
        return None
    if cache.data_ptr() != buf.data_ptr() or cache.stride() != buf.stride():
        return None
    if any(a != b for i, (a, b) in enumerate(zip(cache.shape, buf.shape)) if i != dim):
        return None
    return buf


def cache_append(cache: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    """Equal to ``torch.cat([cache, new], dim)``; see the module docstring for how it is stored."""
    dim = dim % new.dim()
    if cache.dtype != new.dtype or cache.dim() != new.dim():
        return torch.cat([cache, new], dim)  # let cat promote or raise exactly as the graph would
    S, T = cache.shape[dim], new.shape[dim]
    buf = _owned_tail(cache, dim)
    if buf is None or S + T > buf.shape[dim]:
        return _fresh(cache, new, dim)
    buf.narrow(dim, S, T).copy_(new)
    return _view(buf, dim, S + T)


def keep_prefix(view: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """The first ``n`` entries of ``view`` (n <= its length); when ``view`` was its buffer's newest view,
    the result becomes the newest one, so the next ``cache_append`` writes right after it in place."""
    dim = dim % view.dim()
    if n == view.shape[dim]:
        return view
    buf = _owned_tail(view, dim)
    return view.narrow(dim, 0, n) if buf is None else _view(buf, dim, n)
