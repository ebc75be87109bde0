"""Per-KV-head classification: which heads retrieve from long context and which only stream.

A :class:`~graphwright.heads.headset.HeadSet` holds one score per (layer, KV head) and a default
retrieval selection; it is what ``duo`` reads and what the head profilers write:
:func:`profile` (``method="retrieval"``: :mod:`~graphwright.heads.retrieval_score`, arXiv 2404.15574;
``method="duo"``: :mod:`~graphwright.heads.duo_gates`, arXiv 2410.10819).
"""

from graphwright.heads.headset import HeadSet, headset_path, load_headset, shipped_headset


def profile(model, method: str = "retrieval", **kwargs) -> HeadSet:
    """Measure a head set for ``model``; see :func:`graphwright.heads.profiler.profile` for the options."""
    from graphwright.heads.profiler import profile as _profile  # the profilers load models and eval data: import on use

    return _profile(model, method, **kwargs)


__all__ = ["HeadSet", "headset_path", "load_headset", "profile", "shipped_headset"]
