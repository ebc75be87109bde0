"""ONNX translations of ``graphwright.rope_invert`` and ``graphwright.rope_cache_index`` (StreamingLLM).

Both transcribe ``ops/rope_index_ref.py``: angles fp32(max(p, 0) * inv_freq) duplicated to R dims,
rotate_half on the first R dims of each head (the rest pass through), times a gain, cast back
to the input dtype. ``rope_invert`` rotates by -angle with gain 1/scaling at absolute
positions; ``rope_cache_index`` rotates keys by their cache index (CumSum of valid slots - 1,
clamped at 0) and each query by the index of its own slot (the last T slots), repeated over
the g query heads of a KV head. The eviction op that follows stays on the runtime side
(``split.py``).
"""

from __future__ import annotations

from onnxscript import opset23 as op

from ...ops.eviction import ROPE_CACHE_INDEX, ROPE_INVERT
from .translations import FLOAT, register

INT64 = 7  # onnx.TensorProto.INT64


def _angles(pos, inv_freq):
    """cos, sin [..., R] fp32 at positions ``pos`` [...] (negative rotated as 0)."""
    p = op.Cast(op.Max(pos, op.CastLike(op.Constant(value_int=0), pos)), to=FLOAT)
    freqs = op.Mul(op.Unsqueeze(p, [-1]), op.Cast(inv_freq, to=FLOAT))
    emb = op.Concat(freqs, freqs, axis=-1)
    return op.Cos(emb), op.Sin(emb)


def _rotate(x, cos, sin, gain: float, rdim: int, head_dim: int, negate_sin: bool = False):
    axis = op.Constant(value_ints=[3])

    def dims(a, b):
        return op.Slice(x, op.Constant(value_ints=[a]), op.Constant(value_ints=[b]), axis)

    xr = op.Cast(dims(0, rdim), to=FLOAT)
    # one Split, not two Slices: onnxscript's SlicesSplit rewrite would misplace the Split it makes
    lo, hi = op.Split(xr, num_outputs=2, axis=-1)
    rot = op.Concat(op.Neg(hi), lo, axis=-1)
    if negate_sin:
        sin = op.Neg(sin)
    out = op.Mul(op.Add(op.Mul(xr, cos), op.Mul(rot, sin)), op.Constant(value_float=float(gain)))
    out = op.CastLike(out, x)
    return op.Concat(out, dims(rdim, head_dim), axis=-1) if rdim < head_dim else out


@register(ROPE_INVERT)
def rope_invert(x, pos, inv_freq, scaling: float):
    rdim, head_dim = 2 * inv_freq.shape[0], x.shape[3]
    cos, sin = _angles(pos, inv_freq)  # [B, T, R]
    cos, sin = op.Unsqueeze(cos, [1]), op.Unsqueeze(sin, [1])
    return _rotate(x, cos, sin, 1.0 / scaling, rdim, head_dim, negate_sin=True)


@register(ROPE_CACHE_INDEX)
def rope_cache_index(q, k, k_pos, inv_freq, scaling: float):
    rdim, head_dim = 2 * inv_freq.shape[0], q.shape[3]
    H, Hk = q.shape[1], k.shape[1]
    valid = op.Cast(op.GreaterOrEqual(k_pos, op.CastLike(op.Constant(value_int=0), k_pos)), to=INT64)
    idx = op.Max(op.Sub(op.CumSum(valid, op.Constant(value_int=2)), op.Constant(value_int=1)),
                 op.Constant(value_int=0))  # [B, Hk, S]
    ck, sk = _angles(idx, inv_freq)  # [B, Hk, S, R]
    t = op.Shape(q, start=2, end=3)
    q_idx = op.Slice(idx, op.Neg(t), op.Constant(value_ints=[2**62]), op.Constant(value_ints=[2]))  # [B, Hk, T]
    if H != Hk:
        q_idx = op.Expand(op.Unsqueeze(q_idx, [2]), op.Constant(value_ints=[1, 1, H // Hk, 1]))
        q_idx = op.Reshape(q_idx, op.Shape(q, start=0, end=3))
    cq, sq = _angles(q_idx, inv_freq)
    return (_rotate(q, cq, sq, scaling, rdim, head_dim), _rotate(k, ck, sk, scaling, rdim, head_dim))
