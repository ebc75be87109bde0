"""Per-KV-head classification: which heads retrieve from long context and which only stream.

A :class:`~graphwright.heads.headset.HeadSet` holds one score per (layer, KV head) and a default
retrieval selection; it is what ``duo`` reads and what the head profilers write.
"""

from graphwright.heads.headset import HeadSet, headset_path, load_headset, shipped_headset

__all__ = ["HeadSet", "headset_path", "load_headset", "shipped_headset"]
