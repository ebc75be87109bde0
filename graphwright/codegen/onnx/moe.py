"""ONNX translation of ``graphwright.moe_experts`` (routed expert compute) in standard ops.

The expert count is static (the weights' first dim), so the loop over experts is unrolled at
export time, mirroring the reference exactly: for each expert e in ascending order, NonZero
finds the (token, slot) pairs routed to it, only those tokens go through e's MLP, and the
weighted result is accumulated into zeros with ScatterND(reduction="add"). Compute therefore
scales with top_k, not with the expert count (a dense-over-experts formulation would do E/k
times the work), and the accumulation order matches the reference's ``index_add_``.

``com.microsoft.MoE`` is not used: its routing/normalisation contract differs per model family
and it is not part of the standard opset the artifact promises.
"""

from __future__ import annotations

from onnxscript import opset23 as op

from ...capture.ops import MOE_EXPERTS, SUPPORTED_MOE_ACTIVATIONS
from .translations import register


def activation(name: str, x):
    """ONNX form of the MoE activations the reference supports (same names as ``capture.ops._act``)."""
    if name == "silu":
        return op.Mul(x, op.Sigmoid(x))
    if name == "gelu":
        return op.Gelu(x)
    if name == "gelu_pytorch_tanh":
        return op.Gelu(x, approximate="tanh")
    if name == "relu":
        return op.Relu(x)
    raise ValueError(f"unsupported MoE activation {name!r}; supported: {SUPPORTED_MOE_ACTIVATIONS}")


def expert_mlp(x, gate_up, down, act: str):
    """down(act(gate x) * up x) for rows x [M, d]; gate_up [2I, d] (gate rows first), down [d, I]."""
    gate, up = op.Split(op.Gemm(x, gate_up, transB=1), num_outputs=2, axis=-1)
    return op.Gemm(op.Mul(activation(act, gate), up), down, transB=1)


@register(MOE_EXPERTS)
def moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act: str):
    num_experts = gate_up_proj.shape[0]
    out = op.CastLike(op.ConstantOfShape(op.Shape(hidden)), hidden)
    for e in range(int(num_experts)):
        # (token, slot) pairs routed to e, token-major; a token picks an expert at most once,
        # so each token row appears at most once per expert.
        pairs = op.Transpose(op.NonZero(op.Equal(top_k_index, op.Constant(value_int=e))))  # [M, 2]
        tok = op.Slice(pairs, [0], [1], [1])  # [M, 1]
        weight = op.Unsqueeze(op.GatherND(top_k_weights, pairs), [1])  # [M, 1]
        x = op.GatherND(hidden, tok)  # [M, d]
        index = op.Constant(value_int=e)
        y = expert_mlp(x, op.Gather(gate_up_proj, index, axis=0), op.Gather(down_proj, index, axis=0), act)
        if top_k_weights.dtype != hidden.dtype:
            y = op.CastLike(y, weight)  # torch promotes y * w to the (wider) routing-weight dtype
        y = op.CastLike(op.Mul(y, weight), hidden)
        out = op.ScatterND(out, tok, y, reduction="add")
    return out
