"""A decode step over a packed Ada-KV cache on ONNX Runtime: attend to the appended packed buffer, at load time.

Why. The packed per-layer cache of ``snapkv(heads="adaptive"|"scores")`` / ``pyramid=`` (``passes/packed_rewrite.py``)
holds a layer's kept slots of every KV head in one buffer [B, 1, N, D] with per-head positions [B, Hk, N]. The exported
step attends over a wide view built every step (``translations.attention``'s per-KV-head form)::

    k = Reshape(Concat(Expand(k_state, [B, Hk, N, D]), k_new), [B*Hk, 1, N + T, D])       (v the same)
    Attention(Reshape(q, [B*Hk, g, T, D]), k, v, mask [B*Hk, 1, T, N + T])

so a decode step copies Hk times the layer's buffer and each KV head reads all N slots (SmolLM2-135M at a 4k prompt
with ``snapkv(budget=1024, heads="scores", ...)``, ``mass25``: 0.75x dense ORT's decode speed, session 31). The same
step also appends to the packed state (``k_all = Concat(k_state, Reshape(k_new, [B, 1, Hk*T, D]))``, ``pack_heads``)
with its positions (``kp_all = Concat(kp_state, packed_positions(positions))``): exactly the keys a decode query reads.

What. ``find(model)`` (before the other load rewrites) names, per packed layer, its Attention's output and those
appended tensors; ``rewrite(model, found)`` (after ``prompt_attention`` / ``decode_attention``, which turn the
Attention into ``If(T == 1, grouped MatMuls, ...)``, or on the bare Attention) makes the one-row branch::

    scores = MatMul(Reshape(q * scale, [B, 1, H, D]), Transpose(k_all))      # the H query heads as H rows of one KV head
    mask   = Reshape(Expand(Unsqueeze(visible(kp_all, positions), 2), [1, 1, g, 1]), [B, 1, H, -1])
    y      = Reshape(MatMul(Softmax(Where(mask, scores, lowest)), v_all), [B*Hk, g, 1, D])

(query head h*g + i reads KV head h: a pure Reshape of [B*Hk, g, 1, D]; ``visible`` is ``visible_mask``: slot valid,
at or before the query's position, or a padding query) and moves the main-graph nodes that only the wide view needed
(the Expand/Concat/Reshape of k and v, what is left of the mask's cone) into the other branch, so a decode step
neither builds nor reads the wide view: K and V are read once, as a uniform cache's Hk * C slots. The graph on disk is
unchanged.

Eligible: an opset ``Attention`` with ``kv_num_heads`` 1 over such a wide view whose boolean mask is the plain
visibility (no window arithmetic, no float key bias: ``_not_plain_visibility``), with the appends before it; any other
layer keeps its exported attention. Exactness: the same masked fp32 softmax per query head over the same keys in
another slot order (logits within 1e-5 of the rewrite switched off). Tested (``tests/onnx/test_packed_decode_onnx.py``): tiny-Llama packed artifacts
(``heads="adaptive"``, ``pyramid``, ``heads="scores"``) through ``OnnxStep`` with the rewrite on and off over decode
steps (logits within 1e-5, the same greedy tokens), every packed layer rewritten, the wide-view nodes gone from the
main graph; ``bench/ab_onnx_switch.py --switch packed_decode`` measures decode steps off and on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decode_attention import _types
from .prompt_attention import _branch
from .row_cone import _reads

ENABLED = True  # False: packed layers attend over the exported wide view (A/B: bench/ab_onnx_switch.py --switch packed_decode)
_LOWEST = -3.4028234663852886e38  # float32's lowest finite value, as decode_attention
_BOOL = 9  # onnx.TensorProto.BOOL


@dataclass(frozen=True)
class PackedAttention:
    """One packed layer's attention: its output, query input, appended packed K/V/positions, head counts."""

    out: str
    q: str
    k_all: str
    v_all: str
    kp_all: str
    positions: str
    hq: int
    hk: int
    scale: float


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _wide(name, producer, inputs):
    """``Reshape(Concat(Expand(state, .), new), .)`` -> (state, new), else None."""
    r = producer.get(name)
    c = producer.get(r.input[0]) if r is not None and r.op_type == "Reshape" else None
    e = producer.get(c.input[0]) if c is not None and c.op_type == "Concat" and len(c.input) == 2 else None
    if e is None or e.op_type != "Expand" or e.input[0] not in inputs:
        return None
    return e.input[0], c.input[1]


def _appended(state, new, consumers, producer):
    """The ``Concat(state, Reshape(new, .))`` output (the packed append of ``new``), else None."""
    for n in consumers.get(state, ()):
        if n.op_type == "Concat" and len(n.input) == 2 and n.input[0] == state:
            r = producer.get(n.input[1])
            if r is not None and r.op_type == "Reshape" and r.input[0] == new:
                return n.output[0]
    return None


def _cone(name, producer, depth=12) -> set:
    """Names of the main-graph values ``name`` is computed from, ``depth`` nodes back."""
    seen, todo = set(), [(name, 0)]
    while todo:
        x, d = todo.pop()
        if x in seen or d > depth:
            continue
        seen.add(x)
        p = producer.get(x)
        if p is not None:
            todo.extend((i, d + 1) for i in p.input if i)
    return seen


def _positions_append(mask, consumers, producer, inputs):
    """kp_all: the other ``Concat(kp_state, .)`` of the key-position state the mask is built from, else None."""
    cone = _cone(mask, producer)
    states = {n.input[0] for x in cone if (n := producer.get(x)) is not None and n.op_type == "Concat"
              and n.input and n.input[0] in inputs}
    if len(states) != 1:
        return None
    (kp_state,) = states
    others = [n.output[0] for n in consumers.get(kp_state, ()) if n.op_type == "Concat" and n.input[0] == kp_state
              and n.output[0] not in cone]
    return others[0] if len(others) == 1 else None


def _not_plain_visibility(mask, producer, types) -> bool:
    """The Attention's mask is more than ``translations.visibility`` without a window: not boolean (a steering key
    bias is added to a float mask) or built with a ``Sub``/``Add`` (a window's ``q_pos - k_pos < window``). The one-row
    branch rebuilds only the plain visibility, so such a layer keeps its exported attention."""
    t = types.get(mask)
    if t is None or t[0] != _BOOL:
        return True
    return any((n := producer.get(x)) is not None and n.op_type in ("Sub", "Add") for x in _cone(mask, producer))


def find(model, positions: str = "positions") -> list[PackedAttention]:
    """The packed layers' attentions of ``model``'s main graph (module docstring); [] when none or not ``ENABLED``."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    if not ENABLED or positions not in inputs:
        return []
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    types = _types(graph)
    found = []
    for node in graph.node:
        if node.op_type != "Attention" or len(node.input) != 4:
            continue
        kw, vw = _wide(node.input[1], producer, inputs), _wide(node.input[2], producer, inputs)
        if kw is None or vw is None:
            continue
        k_all, v_all = _appended(*kw, consumers, producer), _appended(*vw, consumers, producer)
        kp_all = _positions_append(node.input[3], consumers, producer, inputs)
        if _not_plain_visibility(node.input[3], producer, types):
            continue
        a = _attrs(node)
        if None in (k_all, v_all, kp_all) or a.get("kv_num_heads") != 1 or a.get("is_causal", 0) or a.get("softcap", 0.0):
            continue
        g = int(a["q_num_heads"])
        hk = (types.get(kw[1]) or (None, None))[1]
        hk = hk[1] if hk and len(hk) == 4 else None  # the new keys [B, Hk, T, D]: Hk static in the export
        if not hk:
            continue
        found.append(PackedAttention(node.output[0], node.input[0], k_all, v_all, kp_all, positions, g * hk, hk,
                                     float(a["scale"])))
    return found


def _decode_nodes(p: PackedAttention, out: str, prefix: str) -> list:
    """The one-row attention of ``p`` over the packed buffers, writing ``out`` (module docstring)."""
    from onnx import TensorProto, helper

    g = p.hq // p.hk
    n = lambda s: f"{prefix}{s}"  # noqa: E731 - names local to this node

    def const(name, vals, dtype=TensorProto.INT64, dims=None):
        return helper.make_node("Constant", [], [n(name)], value=helper.make_tensor(
            n(name), dtype, [len(vals)] if dims is None else dims, vals))

    return [
        const("scale", [p.scale], TensorProto.FLOAT, []), const("lowest", [_LOWEST], TensorProto.FLOAT, []),
        const("zero", [0], TensorProto.INT64, []), const("rows", [-1, 1, p.hq, 0]), const("axes2", [2]),
        const("axes23", [2, 3]), const("groups", [1, 1, g, 1]), const("mask_shape", [0, 1, p.hq, -1]),
        const("out_shape", [-1, g, 1, 0]),
        helper.make_node("Mul", [p.q, n("scale")], [n("qs")]),
        helper.make_node("Reshape", [n("qs"), n("rows")], [n("q1")]),  # [B, 1, H, D]
        helper.make_node("Transpose", [p.k_all], [n("kt")], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [n("q1"), n("kt")], [n("scores")]),  # [B, 1, H, S]
        helper.make_node("Unsqueeze", [p.kp_all, n("axes2")], [n("kp")]),  # [B, Hk, 1, S]
        helper.make_node("Unsqueeze", [p.positions, n("axes23")], [n("qp")]),  # [B, 1, 1, 1]
        helper.make_node("GreaterOrEqual", [n("kp"), n("zero")], [n("valid")]),
        helper.make_node("LessOrEqual", [n("kp"), n("qp")], [n("causal")]),
        helper.make_node("Less", [n("qp"), n("zero")], [n("pad_row")]),
        helper.make_node("Or", [n("causal"), n("pad_row")], [n("seen")]),
        helper.make_node("And", [n("valid"), n("seen")], [n("vis")]),  # [B, Hk, 1, S]
        helper.make_node("Expand", [n("vis"), n("groups")], [n("vis_g")]),  # [B, Hk, g, S]
        helper.make_node("Reshape", [n("vis_g"), n("mask_shape")], [n("mask")]),  # [B, 1, H, S]
        helper.make_node("Where", [n("mask"), n("scores"), n("lowest")], [n("masked")]),
        helper.make_node("Softmax", [n("masked")], [n("probs")], axis=-1),
        helper.make_node("MatMul", [n("probs"), p.v_all], [n("o")]),  # [B, 1, H, Dv]
        helper.make_node("Reshape", [n("o"), n("out_shape")], [out]),  # [B*Hk, g, 1, Dv]
    ]


def _is_decode_if(node) -> bool:
    """``decode_attention``'s / ``prompt_attention``'s ``If(T == 1, grouped, ...)`` (its then-branch is the one-row step)."""
    return node.op_type == "If" and (node.name.endswith("if_decode") and node.name.startswith("gw_prompt_attention")
                                     or node.name.startswith("gw_decode_attention"))


def _set_branch(node, which: str, graph) -> None:
    for a in node.attribute:
        if a.name == which:
            a.g.CopyFrom(graph)
            return
    raise ValueError(f"{node.name}: no {which}")


def _branch_of(node, which: str):
    return next(a.g for a in node.attribute if a.name == which)


def _wrap(node, p: PackedAttention, prefix: str) -> list:
    """``If(T == 1, packed one-row attention, node)`` writing ``node``'s output (its own output renamed inside)."""
    from onnx import TensorProto, helper

    inner = type(node)()
    inner.CopyFrom(node)
    inner.output[0] = f"{prefix}other_y"
    return [helper.make_node("Shape", [p.q], [f"{prefix}T"], start=2, end=3),
            helper.make_node("Constant", [], [f"{prefix}one"], value=helper.make_tensor(f"{prefix}one", TensorProto.INT64, [1], [1])),
            helper.make_node("Equal", [f"{prefix}T", f"{prefix}one"], [f"{prefix}is_decode"]),
            helper.make_node("If", [f"{prefix}is_decode"], [p.out], name=f"{prefix}if_decode",
                             then_branch=_branch(_decode_nodes(p, f"{prefix}y", prefix), f"{prefix}y", f"{prefix}then"),
                             else_branch=_branch([inner], inner.output[0], f"{prefix}else"))]


def _move_into_else(nodes: list, ifs: list[int], graph_outputs: set) -> None:
    """Move the main-graph nodes before each If of ``ifs`` (indices into ``nodes``) that only its else-branch needs into
    that branch (first, in order): a node moves when none of its outputs is a graph output, read by the If's condition
    or then-branch, or read by a node that stays in the main graph or moves into another If's branch. One map of who
    reads what serves every If (built once, not once per layer)."""
    readers: dict = {}
    for j, n in enumerate(nodes):
        for name in _reads([n]):
            readers.setdefault(name, set()).add(j)
    moved: dict = {}  # node index -> the If whose else-branch takes it
    for at in ifs:
        node = nodes[at]
        then = _branch_of(node, "then_branch")
        other = set(node.input) | _reads(then.node) | {o.name for o in then.output}
        else_reads = _reads(_branch_of(node, "else_branch").node)
        mine: set = set()
        for j in range(at - 1, -1, -1):
            outs = [o for o in nodes[j].output if o]
            if j in moved or not outs or any(o in graph_outputs or o in other for o in outs):
                continue
            rest = [readers.get(o, set()) - {at} for o in outs]  # the If itself reads them in its else-branch
            if all(r <= mine for r in rest) and any(o in else_reads or r for o, r in zip(outs, rest)):
                mine.add(j)
        body = _branch_of(node, "else_branch")
        kept = list(body.node)
        del body.node[:]
        body.node.extend([nodes[j] for j in sorted(mine)] + kept)
        moved.update(dict.fromkeys(mine, at))
    nodes[:] = [n for j, n in enumerate(nodes) if j not in moved]


def rewrite(model, found: list[PackedAttention]) -> int:
    """Give each ``found`` layer's one-row step the packed attention (module docstring), in place; returns how many."""
    graph = model.graph
    nodes = list(graph.node)
    at_of = {o: j for j, n in enumerate(nodes) for o in n.output}
    outer = {x.name for x in graph.input} | {x.name for x in graph.initializer}
    rewritten, wraps = [], {}
    for i, p in enumerate(found):
        at = at_of.get(p.out)
        if at is None:
            continue
        if any(x not in outer and at_of.get(x, at) >= at for x in (p.q, p.k_all, p.v_all, p.kp_all, p.positions)):
            continue  # the appends must come first: leave it as is
        prefix = f"gw_packed_decode{i}_"
        if _is_decode_if(nodes[at]):
            then_out = _branch_of(nodes[at], "then_branch").output[0].name
            _set_branch(nodes[at], "then_branch", _branch(_decode_nodes(p, then_out, prefix), then_out, f"{prefix}then"))
        else:
            wraps[at] = _wrap(nodes[at], p, prefix)
        rewritten.append(at)
    if not rewritten:
        return 0
    spliced, last = [], {}
    for j, n in enumerate(nodes):  # a wrapped node becomes Shape, Constant, Equal, If: the If is its last node
        spliced.extend(wraps.get(j, [n]))
        last[j] = len(spliced) - 1
    _move_into_else(spliced, sorted(last[j] for j in rewritten), {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(spliced)
    return len(rewritten)
