"""ONNX translation of ``graphwright.think_expand`` (ThinK's narrow keys scattered back to full width).

``think_prune`` (the channel choice and the split of the cache, once after prefill) is a runtime op of
the graph/runtime split (``split.py``): the artifact stops at its inputs and the ONNX Runtime step runs
its reference, so the channels and narrow keys it keeps are bit-for-bit the torch runtime's. The
expansion runs in the graph at every step: ``ScatterElements`` of the narrow keys [B, Hk, S, keep] into
zeros [B, Hk, S, head_dim] at the channel index [B, Hk, 1, keep] broadcast over S (before prefill the
index has no row and S = 0).
"""

from __future__ import annotations

from onnxscript import opset23 as op

from ...ops.think import THINK_EXPAND
from .translations import register


@register(THINK_EXPAND)
def think_expand(k_pruned, channels, head_dim: int):
    lead = op.Shape(k_pruned, start=0, end=3)  # [B, Hk, S]
    shape = op.Concat(lead, op.Constant(value_ints=[head_dim]), axis=0)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), k_pruned), shape)
    index = op.Expand(channels, op.Shape(k_pruned))
    return op.ScatterElements(zeros, index, k_pruned, axis=3)
