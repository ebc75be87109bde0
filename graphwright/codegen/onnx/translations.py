"""ONNX translations of graphwright's custom ops: the registry and ``graphwright.attention``.

A translation is a plain Python function written with onnxscript ops; ``torch.onnx.export``
traces it in place of the custom op node (``custom_translation_table``). Each op's lowering is
one ``@register(OP)`` entry in its own module of this package; every module here is imported by
``translation_table()``, so adding an op (latent attention, fused MoE, ...) is a new file and
nothing else. The pure-torch reference of each op defines the semantics a translation must match.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch
from onnxscript import opset23 as op

from ...capture.ops import ATTENTION

# Modules of this package that are infrastructure, not translations.
_NOT_TRANSLATIONS = {"export", "translations", "split", "gemfilter_export"}

TRANSLATIONS: dict = {}


def register(target):
    """Decorator: ``@register(torch.ops.graphwright.x.default)`` makes the function x's ONNX lowering."""

    def deco(fn):
        TRANSLATIONS[target] = fn
        return fn

    return deco


def translation_table() -> dict:
    """Op overload -> translation, after importing every translation module of this package."""
    package = importlib.import_module(__package__)
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name not in _NOT_TRANSLATIONS and not mod.name.startswith("_"):
            importlib.import_module(f"{__package__}.{mod.name}")
    return dict(TRANSLATIONS)


def graphwright_ops(gm: torch.fx.GraphModule) -> set:
    """The graphwright custom op overloads a graph calls."""
    return {n.target for n in gm.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "graphwright"}


# ---------------------------------------------------------------------------------------------
# attention

# The reference masks with finfo(float32).min rather than -inf so that a row with no visible key
# stays finite; the translation computes in fp32 like the reference, so the same constant applies.
MASKED = float(torch.finfo(torch.float32).min)
FLOAT = 1  # onnx.TensorProtocol.FLOAT


def visibility(q_pos, k_pos, window: int, sinks: int = 0):
    """bool [B, Hk|1, T, S]: True where key j is visible to query i.

    Visible iff 0 <= k_pos[j] <= q_pos[i] (and q_pos - k_pos < window or k_pos < sinks when
    window > 0); padding query rows (q_pos = -1) see every valid key. ``k_pos`` is [B, S] or
    per-KV-head [B, Hk, S]."""
    zero = op.Constant(value_int=0)
    per_head = len(k_pos.shape) == 3
    kp = op.Unsqueeze(k_pos, [2]) if per_head else op.Unsqueeze(k_pos, [1, 2])  # [B, Hk|1, 1, S]
    qp = op.Unsqueeze(q_pos, [1, 3])  # [B, 1, T, 1]
    causal = op.LessOrEqual(kp, qp)
    if window > 0:
        recent = op.Less(op.Sub(qp, kp), op.Constant(value_int=window))
        if sinks > 0:  # the first `sinks` positions stay visible (attention sinks)
            recent = op.Or(recent, op.Less(kp, op.Constant(value_int=sinks)))
        causal = op.And(causal, recent)
    return op.And(op.GreaterOrEqual(kp, zero), op.Or(causal, op.Less(qp, zero)))


def additive_mask(q_pos, k_pos, window: int, num_heads: int, key_bias=None, sinks: int = 0):
    """fp32 additive mask [B, 1|H, T, S]: 0 where key j is visible to query i (``visibility``), MASKED elsewhere.

    ``k_pos`` [B, S] or per-KV-head [B, Hk, S] (then the mask is repeated over each group's query
    heads). ``key_bias`` [B, H, S] is added to every query row. Built from positions inside the
    graph, so the runtime passes no mask.
    """
    per_head = len(k_pos.shape) == 3
    visible = visibility(q_pos, k_pos, window, sinks)
    mask = op.Where(visible, op.Constant(value_float=0.0), op.Constant(value_float=MASKED))
    if per_head:
        # [B, Hk, T, S] -> [B, Hk, g, T, S] -> [B, H, T, S]: query head h uses KV head h // g
        hk = k_pos.shape[1]
        g = num_heads // hk
        mask = op.Unsqueeze(mask, [2])
        mask = op.Expand(mask, op.Constant(value_ints=[1, 1, g, 1, 1]))
        dims = op.Shape(mask)
        mask = op.Reshape(mask, op.Concat(op.Slice(dims, [0], [1]), op.Constant(value_ints=[num_heads]),
                                          op.Slice(dims, [3], [5]), axis=0))
    if key_bias is not None:
        # The reference adds the bias before masking; adding MASKED afterwards gives the same
        # softmax (the masked entries still underflow to exactly 0).
        mask = op.Add(mask, op.Unsqueeze(op.Cast(key_bias, to=FLOAT), [2]))
    return mask


@register(ATTENTION)
def attention(q, k, v, q_pos, k_pos, scale: float, window: int = 0, key_bias=None, sinks: int = 0):
    """Opset-23 ``Attention`` (GQA via its head attributes) with the visibility as its mask.

    Computed in fp32 like the reference (low-precision inputs are cast up, the output back to v's
    dtype). ORT CPU's Attention-23 kernel matches the reference within float rounding for GQA,
    MHA, windows and left padding (tests/onnx), so no MatMul/Softmax fallback is needed.

    Without a key bias the mask is the boolean visibility itself (no fp32 Where over [B, Hk, T, S]).
    Per-KV-head positions (eviction caches): each KV head's query group is its own batch entry
    (q [B*Hk, g, T, D], k/v [B*Hk, 1, S, D], mask [B*Hk, 1, T, S] broadcast over the g query
    heads), so the mask is never expanded to the H query heads: that Expand of a [B, H, T, S]
    tensor per layer was a quarter of a 3k-token prompt step in ONNX Runtime (README, ONNX).

    The exported graph keeps this op for every query length; at load time ``decode_attention.py`` runs one-row
    (decode) steps of it as grouped MatMuls instead (``If(T == 1, ...)``: ORT's kernel is the faster one for a
    prompt, 1.2-1.5x the slower one for a decode step at 4-8k keys).
    """
    num_heads, num_kv = q.shape[1], k.shape[1]
    q32, k32, v32 = (op.Cast(t, to=FLOAT) for t in (q, k, v))
    if key_bias is not None:
        mask = additive_mask(q_pos, k_pos, window, num_heads, key_bias, sinks)
        y, _, _, _ = op.Attention(q32, k32, v32, mask, scale=float(scale),
                                  q_num_heads=int(num_heads), kv_num_heads=int(num_kv))
        return op.CastLike(y, v)
    visible = visibility(q_pos, k_pos, window, sinks)
    if len(k_pos.shape) != 3:  # [B, 1, T, S], broadcast over every head
        y, _, _, _ = op.Attention(q32, k32, v32, visible, scale=float(scale),
                                  q_num_heads=int(num_heads), kv_num_heads=int(num_kv))
        return op.CastLike(y, v)
    g = int(num_heads) // int(num_kv)
    group = op.Constant(value_ints=[-1, g, 0, 0])  # Reshape: 0 copies the input's dim, -1 is B * Hk
    one = op.Constant(value_ints=[-1, 1, 0, 0])
    y, _, _, _ = op.Attention(op.Reshape(q32, group), op.Reshape(k32, one), op.Reshape(v32, one),
                              op.Reshape(visible, one), scale=float(scale), q_num_heads=g, kv_num_heads=1)
    return op.CastLike(op.Reshape(y, op.Constant(value_ints=[-1, int(num_heads), 0, 0])), v)
