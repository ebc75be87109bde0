"""ONNX lowerings of the packed per-layer cache's slot ops (``snapkv(heads="adaptive")`` / ``pyramid=``).

``graphwright.pack_heads`` ([B, Hk, T, D] -> [B, 1, Hk*T, D], head-major) is one Reshape;
``graphwright.packed_positions`` ([B, T] -> [B, Hk, Hk*T]: slot h'*T + t holds pos[t] in head h''s
row and -1 in the others) is a Where over a constant [1, Hk, Hk, 1] identity, then a Reshape. The
references are ``ops/adakv_ref.py``. The selection op (``graphwright.evict_adakv``: a global top-k
across heads, per-row ragged budgets, a data-dependent packed length) stays a runtime op of the
graph/runtime split (``split.py``), like every eviction op: the artifact cuts at its inputs and the
ONNX Runtime step runs its torch reference once after the prompt (decode only appends); so does
``graphwright.evict_adakv_scored`` (``evict(score=..., rule="adaptive")``: Ada-KV budgets over knorm, keydiff,
expected_attention or chunkkv scores, on the same packed layout). Tested in ``tests/onnx/test_duo_packed_onnx.py``
and ``tests/onnx/test_evict_scorers_onnx.py`` against the torch runtime (tokens, logits, kept positions, kv bytes).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxscript import opset23 as op

from ...ops.policy_adakv import PACK_HEADS, PACKED_POSITIONS
from .translations import register


@register(PACK_HEADS)
def pack_heads(x):
    dims = op.Shape(x)
    shape = op.Concat(op.Slice(dims, [0], [1]), op.Constant(value_ints=[1, -1]), op.Slice(dims, [3], [4]), axis=0)
    return op.Reshape(x, shape)


@register(PACKED_POSITIONS)
def packed_positions(pos, num_kv_heads: int):
    hk = int(num_kv_heads)
    eye = op.Constant(value=onnx.numpy_helper.from_array(np.eye(hk, dtype=bool).reshape(1, hk, hk, 1), "eye"))
    spread = op.Unsqueeze(pos, [1, 2])  # [B, 1, 1, T]
    out = op.Where(eye, spread, op.CastLike(op.Constant(value_int=-1), pos))  # [B, Hk, Hk, T]
    shape = op.Concat(op.Slice(op.Shape(pos), [0], [1]), op.Constant(value_ints=[hk, -1]), axis=0)
    return op.Reshape(out, shape)
