"""Pick the Triton attention kernel for one ``graphwright.attention`` call.

The graph keeps one attention node per layer; the variant is read from the call itself:

* T == 1 (decode) -> ``attention_decode`` (split-K, the G query heads of a KV group packed into
  one tile); T > 1 (prefill, chunked prefill) -> ``attention_prefill`` (flash-style).
* ``key_bias`` present (steering) and ``window > 0`` (sliding window, ``sinks``) select the
  ``HAS_BIAS`` / ``HAS_WINDOW`` constexpr specialisations.
* k_pos [B, S] vs per-head [B, Hk, S] (evicted caches) and the GQA group size are strides and
  ints, not flags.

Why constexpr flags rather than generated source: the variants differ by a few lines each (a bias
load, a window test), Triton already compiles one binary per constexpr combination and caches it,
and one readable kernel body per phase keeps the numerics of every variant identical where they
overlap (tested against the reference per combination). Per-head k_pos and GQA are handled by
strides because they change which row is read, not what is computed: making them flags would
double the variants for no saving.
"""

from __future__ import annotations

from .attention_decode import attention_decode
from .attention_prefill import attention_prefill


def attention_triton(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, sinks=0):
    """``graphwright.attention`` on Triton kernels; same arguments and result as the reference."""
    if q.shape[2] == 1:
        return attention_decode(q, k, v, q_pos, k_pos, scale, window, key_bias, sinks)
    return attention_prefill(q, k, v, q_pos, k_pos, scale, window, key_bias, sinks)
