"""ONNX translation of ``graphwright.block_sparse_attention`` (Quest / MoBA top-k key blocks).

The kept-block selection is built in the graph from positions and keys, as the reference
(``ops/block_sparse.py``) defines it, and becomes the additive mask of opset-23 ``Attention``:

* block ids = k_pos // block (-1 for padding); ``onehot`` [B, S, NB] maps keys to blocks, NB
  taken at run time from the largest position (``Range``);
* candidates: blocks that hold a key and start at or before the query's block;
* Quest: page min / max of the keys (the page-summary state inputs the ``block_sparse`` pass
  adds, see ``page_summary.py``; without them a masked ``ReduceMin`` / ``ReduceMax`` over the
  keys), the bound U = sum_d max(q_d m_d, q_d M_d); MoBA: block mean keys (state input, or one
  MatMul with the one-hot map), gate q . mean, own block forced; block scores averaged over each
  KV group's query heads;
* ``TopK`` with k = min(top_k, NB) at run time, the kept blocks mapped back to keys by a MatMul
  with the one-hot map, intersected with the causal mask.

A step with T > 1 is dense unless ``prefill`` (MoBA): T is dynamic in the artifact, so the
translation selects between the block mask and the dense mask with ``Where`` on T == 1. The mask
is computed densely, so the artifact gives the variant's *results* (tested equal to the torch
runtime's tokens); the compute saving of reading only the kept blocks is the kernels' job
(torch gather / Triton), not the mask's.
"""

from __future__ import annotations

from onnxscript import opset23 as op

from ...ops.block_sparse import BLOCK_SPARSE_ATTENTION
from .translations import FLOAT, MASKED, register

INF = float("inf")


def _block_scores(q32, k32, onehot, oh_f, qblk, ar, nb, num_kv: int, g: int, head_dim: int, mode: str, pages):
    """[B, Hk, T, NB] block scores, before the candidate mask. ``pages``: the page-summary state
    inputs (Quest min, max; MoBA mean) or None to compute them here from the keys."""
    qg = op.Reshape(q32, op.Constant(value_ints=[0, num_kv, g, -1, head_dim]))  # [B, Hk, g, T, D]
    if pages is not None:
        nb1 = op.Reshape(nb, op.Constant(value_ints=[1]))
        pages = [op.Slice(p, op.Constant(value_ints=[0]), nb1, op.Constant(value_ints=[2])) for p in pages]  # [B, Hk, NB, D]
    if mode == "quest":
        if pages is not None:
            pmin, pmax = pages
        else:
            kx = op.Unsqueeze(k32, [3])  # [B, Hk, S, 1, D]
            member = op.Unsqueeze(onehot, [1, 4])  # [B, 1, S, NB, 1]
            pmin = op.ReduceMin(op.Where(member, kx, op.Constant(value_float=INF)), [2], keepdims=0)  # [B, Hk, NB, D]
            pmax = op.ReduceMax(op.Where(member, kx, op.Constant(value_float=-INF)), [2], keepdims=0)
            zero = op.Constant(value_float=0.0)
            pmin, pmax = op.Where(op.IsInf(pmin), zero, pmin), op.Where(op.IsInf(pmax), zero, pmax)
        qx = op.Unsqueeze(qg, [4])  # [B, Hk, g, T, 1, D]
        bound = op.Max(op.Mul(qx, op.Unsqueeze(pmin, [2, 3])), op.Mul(qx, op.Unsqueeze(pmax, [2, 3])))
        return op.ReduceMean(op.ReduceSum(bound, [5], keepdims=0), [2], keepdims=0)
    if pages is not None:
        mean = pages[0]
    else:
        counts = op.Unsqueeze(op.ReduceSum(oh_f, [1], keepdims=0), [1, 3])  # [B, 1, NB, 1]
        sums = op.MatMul(op.Unsqueeze(op.Transpose(oh_f, perm=[0, 2, 1]), [1]), k32)  # [B, Hk, NB, D]
        mean = op.Div(sums, op.Max(counts, op.Constant(value_float=1.0)))
    gate = op.MatMul(qg, op.Unsqueeze(op.Transpose(mean, perm=[0, 1, 3, 2]), [2]))  # [B, Hk, g, T, NB]
    score = op.ReduceMean(gate, [2], keepdims=0)
    own = op.Unsqueeze(op.Equal(op.Unsqueeze(qblk, [2]), ar), [1])  # [B, 1, T, NB]
    return op.Where(own, op.Constant(value_float=INF), score)


@register(BLOCK_SPARSE_ATTENTION)
def block_sparse_attention(q, k, v, q_pos, k_pos, scale: float, block: int, top_k: int, mode: str,
                           prefill: bool = False, page_a=None, page_b=None):
    num_heads, num_kv, head_dim = q.shape[1], k.shape[1], q.shape[3]
    g = num_heads // num_kv
    zero, one, size = op.Constant(value_int=0), op.Constant(value_int=1), op.Constant(value_int=block)
    blk = op.Where(op.GreaterOrEqual(k_pos, zero), op.Div(k_pos, size), op.Constant(value_int=-1))  # [B, S]
    nb = op.Add(op.Div(op.ReduceMax(k_pos, keepdims=0), size), one)  # scalar
    ar = op.Range(zero, nb, one)  # [NB]
    onehot = op.Equal(op.Unsqueeze(blk, [2]), ar)  # [B, S, NB]
    oh_f = op.Cast(onehot, to=FLOAT)
    present = op.Greater(op.ReduceMax(oh_f, [1], keepdims=0), op.Constant(value_float=0.0))  # [B, NB]
    qblk = op.Where(op.GreaterOrEqual(q_pos, zero), op.Div(q_pos, size), nb)  # [B, T]; padding rows see all
    cand = op.And(op.Unsqueeze(present, [1]), op.LessOrEqual(ar, op.Unsqueeze(qblk, [2])))  # [B, T, NB]

    q32, k32, v32 = (op.Cast(t, to=FLOAT) for t in (q, k, v))
    pages = None if page_a is None else ([page_a, page_b] if mode == "quest" else [page_a])
    score = _block_scores(q32, k32, onehot, oh_f, qblk, ar, nb, num_kv, g, head_dim, mode, pages)
    score = op.Where(op.Unsqueeze(cand, [1]), score, op.Constant(value_float=-INF))
    kk = op.Min(op.Constant(value_ints=[top_k]), op.Reshape(nb, op.Constant(value_ints=[1])))
    val, idx = op.TopK(score, kk, axis=-1)  # [B, Hk, T, kk]
    picked = op.And(op.Equal(op.Unsqueeze(idx, [4]), ar), op.Unsqueeze(op.Greater(val, op.Constant(value_float=-INF)), [4]))
    sel = op.ReduceMax(op.Cast(picked, to=FLOAT), [3], keepdims=0)  # [B, Hk, T, NB]
    in_kept = op.Greater(op.MatMul(sel, op.Unsqueeze(op.Transpose(oh_f, perm=[0, 2, 1]), [1])),
                         op.Constant(value_float=0.5))  # [B, Hk, T, S]
    if not prefill:  # several queries (prefill) attend densely
        is_decode = op.Equal(op.Shape(q, start=2, end=3), op.Constant(value_ints=[1]))
        in_kept = op.Or(in_kept, op.Not(is_decode))

    kp, qp = op.Unsqueeze(k_pos, [1, 2]), op.Unsqueeze(q_pos, [1, 3])  # [B, 1, 1, S], [B, 1, T, 1]
    visible = op.And(op.GreaterOrEqual(kp, zero), op.Or(op.LessOrEqual(kp, qp), op.Less(qp, zero)))
    allowed = op.And(visible, in_kept)  # [B, Hk, T, S]
    allowed = op.Expand(op.Unsqueeze(allowed, [2]), op.Constant(value_ints=[1, 1, g, 1, 1]))  # [B, Hk, g, T, S]
    dims = op.Shape(allowed)
    allowed = op.Reshape(allowed, op.Concat(op.Slice(dims, [0], [1]), op.Constant(value_ints=[num_heads]),
                                            op.Slice(dims, [3], [5]), axis=0))
    mask = op.Where(allowed, op.Constant(value_float=0.0), op.Constant(value_float=MASKED))
    y, _, _, _ = op.Attention(q32, k32, v32, mask, scale=float(scale), q_num_heads=int(num_heads),
                              kv_num_heads=int(num_kv))
    return op.CastLike(y, v)
