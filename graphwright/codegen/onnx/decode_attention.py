"""One-query-row attention as grouped MatMuls on ONNX Runtime: ``If(T == 1, grouped, Attention)``, at load time.

Why. ORT CPU's opset-23 ``Attention`` kernel is the right op for a prompt (T query rows: it beat MatMul + Softmax by
1.5-1.9x at T = 512-2048 in an ad hoc timing of the op pair, session 20), but at a decode step (T = 1) with GQA it is slow against the bytes it reads:
one layer of SmolLM2-135M (9 query / 3 KV heads, head dim 64) over S cached keys took 0.55 ms at S = 4,096 and 1.12
ms at 8,192 (2 threads, quiet machine), where the same attention written as the g = 3 query heads of each KV head
stacked into one MatMul per KV head takes 0.40 and 0.77 ms (1.38x, 1.46x; equal at S = 256). Over 30 layers that
is ~4.5 ms of a ~57 ms dense step at 4k. ``bench/ab_onnx_switch.py --switch decode_attention`` measures whole decode
steps with the rewrite off and on.

What. ``rewrite(model)`` replaces, in place, every eligible ``Attention(q, k, v, mask)`` node of a step graph by::

    If(Shape(q)[2] == 1,
       then: y = Reshape(MatMul(Softmax(Where(Unsqueeze(mask, 2), Reshape(MatMul(Reshape(q * scale, [B, Hk, g*T, D]),
                                                                                Transpose(k)), [B, Hk, g, T, S]),
                                              lowest)), Reshape(v)) ..., [B, H, T, D])
       else: the Attention node as exported)

(a query row of head h = j*g + i is row i*T + t of KV head j's stacked block: a pure Reshape of [B, H, T, D]).
ORT fuses Transpose + MatMul (+ the scale) into one ``FusedMatMul`` (its ``MatMulTransposeFusion``), so K is read
once, not copied. A graph whose query length is statically 1 (``decode.onnx``) gets the grouped nodes without the
``If``. The graph on disk is unchanged (like ``inplace_kv``): the rewrite runs on the proto a session is built from.

Eligible: opset-23 ``Attention`` with exactly the four inputs q, k, v, mask and only its first output used; 4-D
fp32 q/k/v and a boolean mask whose head axis is 1 (``translations.attention``'s forms: shared positions
[B, 1, T, S]; per-KV-head positions as [B*Hk, 1, T, S] with q [B*Hk, g, T, D], ``kv_num_heads`` 1); no ``is_causal``,
``softcap`` or ``qk_matmul_output_mode``. Anything else (steering's additive key bias, fp16 graphs, past-KV inputs)
keeps its Attention node.

Exactness: the same masked softmax in fp32; masked scores are the lowest float instead of ORT's own masking, so a
row's weights agree to float rounding (the op pair's outputs differ by ~1e-7). Rows that see no key at all do not
occur (``translations.visibility``: a padding query row sees every valid key). Tested
(``tests/onnx/test_decode_attention.py``): the rewritten node against ``Attention`` for T = 1 and T > 1, shared and
per-KV-head masks, batch 2; tiny-Llama artifacts (dense, in-place cache; an evicting decode graph) through
``OnnxStep`` with the rewrite on and off over 40 decode steps: logits within 1e-5, the same greedy tokens.
"""

from __future__ import annotations

ENABLED = True  # False: every Attention node runs as exported (A/B: bench/ab_onnx_switch.py --switch decode_attention)
_FLOAT, _BOOL = 1, 9  # onnx.TensorProto.FLOAT, BOOL
_LOWEST = -3.4028234663852886e38  # float32's lowest finite value: exp(lowest - max) is exactly 0 in fp32


def _types(graph) -> dict:
    """name -> (elem_type, [dim value or None]) from the graph's inputs, outputs and value_info."""
    out = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
        out[v.name] = (t.elem_type, dims)
    return out


def _eligible(node, types: dict, used: set) -> str | None:
    """Why ``node`` keeps its Attention (None: it is rewritten)."""
    from onnx import helper

    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
        return "not an opset Attention"
    if len(node.input) != 4 or any(not n for n in node.input):
        return "inputs other than q, k, v, mask"
    if any(o in used for o in node.output[1:] if o):
        return "a second output is read"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if not {"q_num_heads", "kv_num_heads", "scale"} <= set(attrs):
        return "no head counts or scale"
    if attrs.get("is_causal", 0) or attrs.get("softcap", 0.0) or attrs.get("qk_matmul_output_mode", 0):
        return "is_causal, softcap or qk_matmul_output_mode"
    hq, hk = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
    if hk <= 0 or hq % hk:
        return "query heads not a multiple of KV heads"
    q, k, v, m = (types.get(n) for n in node.input)
    if any(t is None or t[1] is None for t in (q, k, v, m)):
        return "unknown input types"
    if any(t[0] != _FLOAT or len(t[1]) != 4 for t in (q, k, v)) or m[0] != _BOOL or len(m[1]) != 4:
        return "not fp32 4-D q/k/v with a 4-D boolean mask"
    if q[1][1] not in (None, hq) or k[1][1] not in (None, hk) or m[1][1] != 1:
        return "head axes do not match the head counts, or a mask per head"
    return None


def _grouped_nodes(node, out: str, prefix: str) -> list:
    """The grouped MatMul attention of ``node`` as nodes writing ``out`` (module docstring)."""
    from onnx import TensorProto, helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    hq, hk, scale = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"]), float(attrs["scale"])
    g = hq // hk
    q, k, v, mask = node.input
    n = lambda s: f"{prefix}{s}"  # noqa: E731 - names local to this node

    def const(name, vals, dtype=TensorProto.INT64, dims=None):
        return helper.make_node("Constant", [], [n(name)], value=helper.make_tensor(
            n(name), dtype, [len(vals)] if dims is None else dims, vals))

    return [
        const("scale", [scale], TensorProto.FLOAT, []), const("lowest", [_LOWEST], TensorProto.FLOAT, []),
        const("stack", [0, hk, -1, 0]),  # [B, H, T, D] -> [B, Hk, g*T, D]; 0 copies B and D
        const("axis2", [2]), const("b_hk_g_t", [0, hk, g, -1]), const("b_hk_rows", [0, hk, -1]),
        const("b_h_t_d", [0, hq, -1, 0]),
        helper.make_node("Shape", [k], [n("S")], start=2, end=3),
        helper.make_node("Concat", [n("b_hk_g_t"), n("S")], [n("shape5")], axis=0),
        helper.make_node("Concat", [n("b_hk_rows"), n("S")], [n("shape4")], axis=0),
        helper.make_node("Mul", [q, n("scale")], [n("qs")]),
        helper.make_node("Reshape", [n("qs"), n("stack")], [n("qg")]),
        helper.make_node("Transpose", [k], [n("kt")], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [n("qg"), n("kt")], [n("scores")]),  # [B, Hk, g*T, S]
        helper.make_node("Reshape", [n("scores"), n("shape5")], [n("scores5")]),  # [B, Hk, g, T, S]
        helper.make_node("Unsqueeze", [mask, n("axis2")], [n("mask5")]),  # [B, 1, 1, T, S]
        helper.make_node("Where", [n("mask5"), n("scores5"), n("lowest")], [n("masked")]),
        helper.make_node("Softmax", [n("masked")], [n("p5")], axis=-1),
        helper.make_node("Reshape", [n("p5"), n("shape4")], [n("p")]),
        helper.make_node("MatMul", [n("p"), v], [n("o")]),  # [B, Hk, g*T, D]
        helper.make_node("Reshape", [n("o"), n("b_h_t_d")], [out]),
    ]


def rewrite(model) -> int:
    """Rewrite ``model`` (a ModelProto, changed in place) as the module docstring says; returns how many Attention
    nodes now run grouped at T = 1. The main graph only (step graphs have no subgraphs of their own)."""
    from onnx import TensorProto, helper

    graph = model.graph
    types = _types(graph)
    used = {i for nd in graph.node for i in nd.input} | {o.name for o in graph.output}
    new_nodes, count = [], 0
    for idx, node in enumerate(graph.node):
        if _eligible(node, types, used) is not None:
            new_nodes.append(node)
            continue
        prefix = f"gw_decode_attention{idx}_"
        q_len = types[node.input[0]][1][2]
        out = node.output[0]
        if q_len == 1:  # decode.onnx: always one query row
            new_nodes.extend(_grouped_nodes(node, out, prefix))
        else:
            then_out, else_out = f"{prefix}grouped_y", f"{prefix}attention_y"
            then_g = helper.make_graph(_grouped_nodes(node, then_out, prefix), f"{prefix}then", [],
                                       [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, None)])
            original = helper.make_node("Attention", list(node.input), [else_out], name=f"{prefix}attention",
                                        domain=node.domain)
            original.attribute.extend(node.attribute)
            else_g = helper.make_graph([original], f"{prefix}else", [],
                                       [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, None)])
            new_nodes.extend([
                helper.make_node("Shape", [node.input[0]], [f"{prefix}T"], start=2, end=3),
                helper.make_node("Constant", [], [f"{prefix}one"],
                                 value=helper.make_tensor(f"{prefix}one", TensorProto.INT64, [1], [1])),
                helper.make_node("Equal", [f"{prefix}T", f"{prefix}one"], [f"{prefix}is_decode"]),
                helper.make_node("If", [f"{prefix}is_decode"], [out], name=f"{prefix}if",
                                 then_branch=then_g, else_branch=else_g),
            ])
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return count
