"""ONNX translation of ``graphwright.page_summary`` (block_sparse's per-page key min / max / mean).

The artifact recomputes every page from the cache at each step instead of updating the newest
page (``ops/page_summary.py`` defines both as equal), with O(S * D) memory: each row's keys are
gathered into position order (column = position + the row's left padding; the runtime's cache
holds consecutive positions after the padding), padded to whole pages, reshaped to
[B, pages, block, Hk, D] and reduced over the block axis. Positions past a row's length and
pages without keys give 0, as in the reference.
"""

from __future__ import annotations

from onnxscript import opset23 as op

from ...ops.page_summary import PAGE_SUMMARY
from .translations import FLOAT, register

INT64 = 7  # onnx.TensorProto.INT64
FILL = {"min": float("inf"), "max": float("-inf"), "mean": 0.0}


@register(PAGE_SUMMARY)
def page_summary(k, k_pos, q_pos, prev, block: int, stat: str):
    num_kv, head_dim = k.shape[1], k.shape[3]
    size = op.Constant(value_ints=[block])
    s1 = op.Shape(k, start=2, end=3)  # [1]
    pages = op.Div(op.Add(s1, op.Constant(value_ints=[block - 1])), size)  # [1] = ceil(S / block)
    ar = op.Range(op.Constant(value_int=0), op.Squeeze(op.Mul(pages, size), [0]), op.Constant(value_int=1))  # [L]
    lens = op.ReduceSum(op.Cast(op.GreaterOrEqual(k_pos, op.Constant(value_int=0)), to=INT64), [1], keepdims=1)  # [B, 1]
    valid = op.Less(ar, lens)  # [B, L]: position p exists in the row
    cols = op.Where(valid, op.Add(ar, op.Sub(s1, lens)), op.Constant(value_int=0))  # [B, L] column of position p
    kt = op.Cast(op.Transpose(k, perm=[0, 2, 1, 3]), to=FLOAT)  # [B, S, Hk, D]
    x = op.GatherND(kt, op.Unsqueeze(cols, [2]), batch_dims=1)  # [B, L, Hk, D]
    x = op.Where(op.Unsqueeze(valid, [2, 3]), x, op.Constant(value_float=FILL[stat]))
    x = op.Reshape(x, op.Concat(op.Constant(value_ints=[0]), pages, op.Constant(value_ints=[block, num_kv, head_dim]), axis=0))
    zero = op.Constant(value_float=0.0)
    if stat == "mean":
        count = op.ReduceSum(op.Cast(op.Reshape(valid, op.Concat(op.Constant(value_ints=[0]), pages, size, axis=0)), to=FLOAT),
                             [2], keepdims=0)  # [B, pages]
        out = op.Div(op.ReduceSum(x, [2], keepdims=0), op.Unsqueeze(op.Max(count, op.Constant(value_float=1.0)), [2, 3]))
    else:
        out = op.ReduceMin(x, [2], keepdims=0) if stat == "min" else op.ReduceMax(x, [2], keepdims=0)
        out = op.Where(op.IsInf(out), zero, out)  # pages without keys
    return op.Transpose(out, perm=[0, 2, 1, 3])  # [B, Hk, pages, D]
