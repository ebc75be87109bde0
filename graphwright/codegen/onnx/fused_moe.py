"""ONNX translation of ``graphwright.fused_moe`` (router + routed experts) in standard ops.

The router is transcribed per kind, cast for cast, from ``ops/moe_routing.py`` (the reference):
logits = Gemm(hidden, router_weight^T) (+ bias) in the model dtype, then

* ``mixtral``: Softmax in fp32, TopK, divide by the sum (weights stay fp32);
* ``qwen2_moe``: Softmax in fp32, TopK, divide only if ``norm_topk_prob``, weights cast back;
* ``sparsemixer`` (PhiMoE, top-2): two rounds of ArgMax + threshold mask + Softmax.

ONNX TopK breaks ties towards the lower index, like ``torch.topk`` on CPU. The experts reuse the
``graphwright.moe_experts`` translation (``moe.py``): per expert, NonZero + GatherND + two Gemms +
ScatterND(add), so compute scales with top_k. Returns ``(out, router_logits)`` like the op.
"""

from __future__ import annotations

from onnxscript import opset23 as op

from ...ops.fused_moe import FUSED_MOE
from .moe import moe_experts
from .translations import FLOAT, register

NEG_INF = float("-inf")


def _sparsemixer_mask(scores, masked, jitter_eps: float):
    """(mask, argmax): ((m - s) / max(|s|, m)) > 2 eps with m = max of ``masked`` (see the reference)."""
    selected = op.ArgMax(masked, axis=-1, keepdims=1)
    threshold = op.ReduceMax(masked, op.Constant(value_ints=[-1]), keepdims=1)
    factor = op.Max(op.Abs(scores), threshold)
    eps2 = op.CastLike(op.Constant(value_float=2.0 * jitter_eps), scores)
    return op.Greater(op.Div(op.Sub(threshold, scores), factor), eps2), selected


def _route_sparsemixer(scores, jitter_eps: float):
    neg = op.CastLike(op.Constant(value_float=NEG_INF), scores)
    mask, sel = _sparsemixer_mask(scores, scores, jitter_eps)
    w1 = op.GatherElements(op.Softmax(op.Where(mask, neg, scores), axis=-1), sel, axis=-1)
    masked = op.ScatterElements(scores, sel, op.Expand(neg, op.Shape(sel)), axis=-1)
    mask2, sel2 = _sparsemixer_mask(scores, masked, jitter_eps)
    w2 = op.GatherElements(op.Softmax(op.Where(mask2, neg, masked), axis=-1), sel2, axis=-1)
    return op.Concat(w1, w2, axis=-1), op.Concat(sel, sel2, axis=-1)


@register(FUSED_MOE)
def fused_moe(hidden, router_weight, router_bias, gate_up_proj, down_proj, router: str, top_k: int, act: str,
              jitter_eps: float, norm_topk_prob: bool):
    if router_bias is not None:
        logits = op.Gemm(hidden, router_weight, router_bias, transB=1)
    else:
        logits = op.Gemm(hidden, router_weight, transB=1)
    k = op.Constant(value_ints=[int(top_k)])
    if router == "mixtral":
        top, index = op.TopK(op.Softmax(op.Cast(logits, to=FLOAT), axis=-1), k, axis=-1)
        weights = op.Div(top, op.ReduceSum(top, op.Constant(value_ints=[-1]), keepdims=1))
    elif router == "qwen2_moe":
        top, index = op.TopK(op.Softmax(op.Cast(logits, to=FLOAT), axis=-1), k, axis=-1)
        if norm_topk_prob:
            top = op.Div(top, op.ReduceSum(top, op.Constant(value_ints=[-1]), keepdims=1))
        weights = op.CastLike(top, logits)
    elif router == "sparsemixer":
        if int(top_k) != 2:
            raise ValueError(f"sparsemixer routing is top-2 only; got top_k={top_k}")
        weights, index = _route_sparsemixer(logits, float(jitter_eps))
    else:
        raise ValueError(f"no ONNX lowering for MoE router {router!r}; known: mixtral, qwen2_moe, sparsemixer")
    out = moe_experts(hidden, index, weights, gate_up_proj, down_proj, act)
    return out, logits
