"""A long prompt step in query blocks on ONNX Runtime: its attention and column sums as loops over row blocks, at load time.

Why. An evicting artifact runs its prompt as one step (``prompt_slots.py``: splitting it into chunks would change
what StreamingLLM, H2O and SnapKV keep), and ORT CPU's opset-23 ``Attention`` materialises the whole
[B, H, T, S] fp32 score matrix of such a step: 2.3 GB per layer for SmolLM2-135M at an 8,064-token prompt
(9 heads x 8,064^2 x 4 bytes), and it computes every score above the causal diagonal only to mask it. In session 21's
8k run (``bench/results/decode/s21_p8k_onnx.md``) the prompt step of ``streaming``/``snapkv`` at 25% KV held 3.5 GB
above the process (dense ORT, which runs its prompt in 512-token steps: 1.6 GB) and ran at 59-63 tokens/s against
dense's 186. ``bench/ab_onnx_switch.py --switch prompt_attention --prompt-steps 2`` measures prompt steps with this
rewrite off and on.

What. ``rewrite(model)`` changes, in place, the main graph of a step (the artifact on disk is unchanged, like
``decode_attention``):

* every eligible ``Attention(q, k, v, mask)`` node whose query length is not statically 1 becomes::

      If(T == 1, decode_attention's grouped MatMuls,                       (when decode_attention.ENABLED)
         If(T > BLOCK,
            ConcatFromSequence(Loop(ceil(T / BLOCK)) { rows a..b = i*BLOCK .. min(a + BLOCK, T):
                e = S - T + b, or S when the block's mask lets a row see a key at or past index e;
                seq.append(Attention(q[:, :, a:b], k[:, :, :e], v[:, :, :e], mask[:, :, a:b, :e])) }, axis=2),
            Attention(q, k, v, mask)))

  and the nodes that build the mask from positions (its row-wise cone, ``row_cone.py``) move into the branches: the
  loop recomputes the block's rows of the mask, so no [., T, S] mask is ever whole in a long step;
* every ``ReduceSum`` over the rows (axis -2) of a row-wise cone that holds a ``Softmax`` (the column sums of
  attention probabilities that H2O and SnapKV score with: ``prompt_slots.prompt_colsum``) becomes
  ``If(T > BLOCK, the sum over blocks of each block's ReduceSum, ReduceSum)``, the probabilities recomputed per block.
  When they are a softmax of ``Where(c, lowest, scores)`` times query weights (``_softmax_mask``; H2O's), a block
  computes only the key columns before its causal edge, as the attention blocks do: the tensors that bring the columns
  (the keys, the key positions: ``row_cone.column_tensors``) are sliced to [0, e) and the block's sum is padded with
  zeros to S. ``e`` is S - T + b when ``c`` hides every later column from every row of the block and each row sees an
  earlier one (recomputed per block from ``c``'s boolean cone), else S (``CAUSAL_COLUMNS``; before it, every column was
  computed and masked, and H2O's 8k prompt step took 1.79x as long: ``bench/results/decode/s24_ab_causal_columns_*``).
  In those copies a ``Where(c, lowest, x)`` read by the Softmax is written as an additive mask (``_additive_masks``,
  bit-exact).

So a long step holds the scores of BLOCK query rows at a time, and the keys a block reads stop at the causal edge: in a
graphwright step the new tokens are the last T keys, in order, so a query row t sees no key past index S - T + t. That
is not assumed: the block reads its mask's columns from e on (one bool ReduceMax) and keeps every key when any is
visible there (padding query rows of a left-padded batch see every valid key, for example).

Exactness: each query row gets the same masked softmax over the same visible keys; the keys dropped are masked for
every row of the block, and a masked score contributes exactly 0. The attention output agreed bit for bit with the
one-shot op on SmolLM2-135M's 4k StreamingLLM and SnapKV prompts; a column sum adds its per-block sums in another order
(H2O's scores: ~1e-7 relative). Cutting a block's columns at its edge changes no bit: a dropped column's probability is
exp(lowest - max) = 0 in every row of the block (each row has a larger score), its weighted sum +0, and the pad adds +0
(H2O's 8k prompt step on SmolLM2-135M: the same state and logits bit for bit, cut or not). Eligible Attention nodes
are ``decode_attention``'s (``_eligible``: fp32 4-D q/k/v, a boolean [., 1, T, S] mask, no causal/softcap/output-mode
attribute). Tested (``tests/onnx/test_prompt_attention.py``): the rewritten nodes against the op and the one-shot sum
with T above and below BLOCK and T = 1, shared and per-KV-head masks, a left-padded batch and a past, the mask no longer
built whole; the column sums cut at each block's edge equal the uncut ones bit for bit, with the edges each block read
(S where a padding row sees later keys); the StreamingLLM, H2O and SnapKV tiny-Llama artifacts through ``OnnxStep``
with the rewrite off and on: the same kept positions, K/V, logits and greedy tokens.
"""

from __future__ import annotations

from . import decode_attention, row_cone
from .decode_attention import _eligible, _types

ENABLED = True  # False: a prompt step's attention runs as exported (A/B: bench/ab_onnx_switch.py --switch prompt_attention)
# query rows per block: 75 MB of fp32 scores per layer at an 8k prompt; a StreamingLLM 8k prompt step on SmolLM2-135M
# (ORT's arena on, fresh process) ran in 28.3 s at 256 rows, 28.6 s at 128 and 34.5 s at 512 (peak +1,055 / +1,011 /
# +1,210 MB), session 22
BLOCK = 256
# a blocked column sum of masked softmax probabilities computes only the key columns before each block's causal edge
# (``_row_sum_nodes``); False: every column, masked to zeros (A/B: bench/ab_onnx_switch.py --switch causal_columns)
CAUSAL_COLUMNS = True


def _const(name, vals, dims=None):
    from onnx import TensorProto, helper

    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, TensorProto.INT64, [len(vals)] if dims is None else dims, vals))


def _loop(prefix: str, trips: str, body_nodes: list, item: str, out: str, axis: int | None) -> list:
    """``Loop(trips)`` over ``body_nodes`` (which read ``{prefix}i``, the iteration, and write ``item``), the items
    concatenated on ``axis`` into ``out`` (``axis`` None: stacked on a new axis 0)."""
    from onnx import TensorProto, helper

    n = lambda s: f"{prefix}{s}"  # noqa: E731 - names local to this loop
    body = helper.make_graph(
        [*body_nodes, helper.make_node("SequenceInsert", [n("seq_in"), item], [n("seq_out")]),
         helper.make_node("Identity", [n("cond_in")], [n("cond_out")])], n("body"),
        [helper.make_tensor_value_info(n("i"), TensorProto.INT64, []),
         helper.make_tensor_value_info(n("cond_in"), TensorProto.BOOL, []),
         helper.make_tensor_sequence_value_info(n("seq_in"), TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(n("cond_out"), TensorProto.BOOL, []),
         helper.make_tensor_sequence_value_info(n("seq_out"), TensorProto.FLOAT, None)])
    concat = (helper.make_node("ConcatFromSequence", [n("seq")], [out], axis=axis) if axis is not None
              else helper.make_node("ConcatFromSequence", [n("seq")], [out], axis=0, new_axis=1))
    return [helper.make_node("SequenceEmpty", [], [n("seq0")], dtype=TensorProto.FLOAT),
            helper.make_node("Loop", [trips, "", n("seq0")], [n("seq")], body=body, name=n("loop")), concat]


def _rows(prefix: str, T: str, block: int) -> tuple[list, list]:
    """Main-graph nodes (constants, ``T_s`` = the row count ``T`` [1] as a scalar, ``trips`` = ceil(T / block),
    ``long`` = T > block) and the loop body's first nodes (``a``/``b``: rows [a, b) of iteration ``i``; ``a1``/``b1``
    as [1] tensors)."""
    from onnx import helper

    n = lambda s: f"{prefix}{s}"  # noqa: E731
    T_s = n("T_s")
    outer = [_const(n("zero1"), [0]), helper.make_node("Squeeze", [T, n("zero1")], [T_s]),
             _const(n("one1"), [1]), _const(n("axis_m2"), [-2]),
             _const(n("block_s"), [block], []), _const(n("block_less1"), [block - 1], []),
             helper.make_node("Add", [T_s, n("block_less1")], [n("t_up")]),
             helper.make_node("Div", [n("t_up"), n("block_s")], [n("trips")]),
             helper.make_node("Greater", [T_s, n("block_s")], [n("long")])]
    body = [helper.make_node("Mul", [n("i"), n("block_s")], [n("a")]),
            helper.make_node("Add", [n("a"), n("block_s")], [n("a_next")]),
            helper.make_node("Min", [n("a_next"), T_s], [n("b")]),
            helper.make_node("Unsqueeze", [n("a"), n("zero1")], [n("a1")]),
            helper.make_node("Unsqueeze", [n("b"), n("zero1")], [n("b1")])]
    return outer, body


def _branch(nodes: list, out: str, name: str):
    from onnx import TensorProto, helper

    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _attention(node, inputs, output, name):
    from onnx import helper

    a = helper.make_node("Attention", inputs, [output], name=name, domain=node.domain)
    a.attribute.extend(node.attribute)
    return a


def _attention_nodes(node, found, g: row_cone.Graph, prefix: str, block: int, grouped: bool) -> list:
    """``node``'s replacement (module docstring): the mask's row-wise cone ``found`` (``row_cone.cone``) is recomputed
    per block in the loop and copied whole into the branches that read every row, so the main graph no longer builds
    the [., T, S] mask."""
    from onnx import helper

    q, k, v, mask = node.input
    n = lambda s: f"{prefix}{s}"  # noqa: E731 - names local to this node
    outer, body = _rows(prefix, n("T"), block)
    rows, ren = row_cone.rows_nodes(found, g, n("r_"), n("a1"), n("b1"), n("one1"), n("zero1"), n("axis_m2"))
    mrows = ren.get(mask, mask)
    body += rows + [  # keys [0, e): the causal edge S - T + b, or S when a row of the block sees a key past it
        helper.make_node("Slice", [q, n("a1"), n("b1"), n("axis2")], [n("qb")]),
        helper.make_node("Add", [n("b1"), n("s_minus_t")], [n("edge")]),
        # the mask's columns from the edge on (the last column when the edge is S: ReduceMax refuses an empty bool set)
        helper.make_node("Min", [n("edge"), n("s_minus_1")], [n("tail_start")]),
        helper.make_node("Slice", [mrows, n("tail_start"), n("S"), n("axis3")], [n("tail")]),
        helper.make_node("ReduceMax", [n("tail")], [n("sees_tail")], keepdims=0),
        helper.make_node("Where", [n("sees_tail"), n("S"), n("edge")], [n("e")]),
        helper.make_node("Slice", [k, n("zero1"), n("e"), n("axis2")], [n("kb")]),
        helper.make_node("Slice", [v, n("zero1"), n("e"), n("axis2")], [n("vb")]),
        helper.make_node("Slice", [mrows, n("zero1"), n("e"), n("axis3")], [n("mb")]),
        _attention(node, [n("qb"), n("kb"), n("vb"), n("mb")], n("yb"), n("attention_block"))]
    full, fren = row_cone.rows_nodes(found, g, n("s_"))
    short = _branch([*full, _attention(node, [q, k, v, fren.get(mask, mask)], n("attention_y"), n("attention"))],
                    n("attention_y"), n("short"))
    long_ = _branch(_loop(prefix, n("trips"), body, n("yb"), n("blocked_y"), axis=2), n("blocked_y"), n("long"))
    prompt_out = n("prompt_y") if grouped else node.output[0]
    nodes = [helper.make_node("Shape", [q], [n("T")], start=2, end=3),
             helper.make_node("Shape", [k], [n("S")], start=2, end=3), *outer,
             _const(n("axis2"), [2]), _const(n("axis3"), [3]),
             helper.make_node("Sub", [n("S"), n("T")], [n("s_minus_t")]),
             helper.make_node("Sub", [n("S"), n("one1")], [n("s_minus_1")])]
    if_prompt = helper.make_node("If", [n("long")], [prompt_out], name=n("if_long"), then_branch=long_, else_branch=short)
    if not grouped:
        return [*nodes, if_prompt]
    gfull, gren = row_cone.rows_nodes(found, g, n("g_"))
    one_row = _attention(node, [q, k, v, gren.get(mask, mask)], node.output[0], n("one_row"))
    decode = _branch([*gfull, *decode_attention._grouped_nodes(one_row, n("grouped_y"), n("d_"))], n("grouped_y"),
                     n("decode"))
    return [*nodes, helper.make_node("Equal", [n("T"), n("one1")], [n("is_decode")]),
            helper.make_node("If", [n("is_decode")], [node.output[0]], name=n("if_decode"), then_branch=decode,
                             else_branch=_branch([if_prompt], prompt_out, n("prompt")))]


def _additive_masks(nodes: list, g: row_cone.Graph, prefix: str) -> list:
    """``nodes`` with each ``Where(c, lowest, x)`` (or ``Where(c, x, lowest)``) read only by a last-axis ``Softmax`` written
    as ``Add(x, Where(c, lowest, 0))``: the select then runs on the mask's broadcast shape ([., 1, rows, S], not the
    scores' [., g, rows, S]) and the Add broadcasts it (ORT CPU's three-input Where broadcast is the slow kernel: 2.3x
    the Where + Add pair on a [3, 3, 512, 4096] block). Bit-exact: x + 0 is x, and lowest + x rounds to lowest for any
    |x| < 1e31 (an attention score), so the Softmax reads the same values."""
    from onnx import TensorProto, helper

    readers: dict[str, list] = {}
    for nd in nodes:
        for i in nd.input:
            readers.setdefault(i, []).append(nd)
    out, zero, has_zero = [], f"{prefix}additive_zero", False
    for nd in nodes:
        fill = [j for j in (1, 2) if nd.op_type == "Where" and _is_lowest(g, nd.input[j])]
        rd = readers.get(nd.output[0], [])
        if not fill or len(rd) != 1 or rd[0].op_type != "Softmax" or any(
                a.name == "axis" and helper.get_attribute_value(a) != -1 for a in rd[0].attribute):
            out.append(nd)
            continue
        c, low, x = nd.input[0], nd.input[fill[0]], nd.input[3 - fill[0]]
        if not has_zero:
            out.insert(0, helper.make_node("Constant", [], [zero], value=helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0])))
            has_zero = True
        bias = f"{nd.output[0]}_additive"
        out += [helper.make_node("Where", [c, low, zero] if fill[0] == 1 else [c, zero, low], [bias]),
                helper.make_node("Add", [x, bias], [nd.output[0]])]
    return out


def _is_lowest(g: row_cone.Graph, name: str) -> bool:
    """Whether ``name`` is a float32 scalar constant at or below float32's lowest (a masked_fill value)."""
    t = g.consts.get(name)
    if t is None or t.data_type != 1 or list(t.dims) not in ([], [1]) or t.data_location == 1:
        return False
    from onnx import numpy_helper

    return float(numpy_helper.to_array(t).reshape(-1)[0]) <= -3.4028234663852886e38


def _row_sum_cone(node, g: row_cone.Graph):
    """The row-wise cone of a ``ReduceSum`` over the rows (axis -2) of a softmax's output (H2O's and SnapKV's column
    sums of attention probabilities: ``prompt_slots.prompt_colsum``), or None."""
    from onnx import helper

    if node.op_type != "ReduceSum" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    dims, axes = g.dims.get(node.input[0]), g.const_values(node.input[1])
    if dims is None or axes is None or len(axes) != 1 or axes[0] not in (-2, len(dims) - 2):
        return None
    if any(a.name == "noop_with_empty_axes" and helper.get_attribute_value(a) for a in node.attribute):
        return None
    found = row_cone.cone(node.input[0], g)
    if found is None or not any(nd.op_type == "Softmax" for nd in found[0]) or not row_cone.row_leaves(found, g):
        return None
    return found


def _softmax_mask(found, g: row_cone.Graph, x: str):
    """``(c, masked_if)`` when ``x`` is a last-axis ``Softmax`` of ``Where(c, lowest, s)`` (``masked_if`` True) or
    ``Where(c, s, lowest)`` (False), times only factors that are not themselves made from the probabilities; else None.
    Then a column that ``c`` masks for every row (each row seeing some other column) is exactly 0 in ``x``."""
    nodes = found[0]
    producer = {o: nd for nd in nodes for o in nd.output}
    soft = [nd for nd in nodes if nd.op_type in ("Softmax", "LogSoftmax")]
    if len(soft) != 1 or soft[0].op_type != "Softmax":
        return None
    down = {soft[0].output[0]}
    for nd in nodes[nodes.index(soft[0]) + 1:]:
        reads = [i for i in nd.input if i in down]
        if not reads:
            continue
        if nd.op_type != "Mul" or len(reads) != 1:  # p * w is 0 where p is 0 (w: a query weight, finite)
            return None
        down.add(nd.output[0])
    where = producer.get(soft[0].input[0])
    if x not in down or where is None or where.op_type != "Where":
        return None
    fill = [j for j in (1, 2) if _is_lowest(g, where.input[j])]
    return (where.input[0], fill[0] == 1) if len(fill) == 1 else None


def _edge_nodes(found, g: row_cone.Graph, mask, n) -> list:
    """Loop-body nodes for ``e`` [1], the key columns a block of rows [a1, b1) reads (``_row_sum_nodes``): the causal edge
    S - T + b when the mask ``(c, masked_if)`` hides every column from it on for every row of the block and each row
    sees a column before it, else S. ``c`` is recomputed for the block's rows over every column (boolean ops)."""
    from onnx import helper

    c, masked_if = mask
    cone = row_cone.cone(c, g) or ([], [c])
    rows, ren = row_cone.rows_nodes(cone, g, n("m_"), n("a1"), n("b1"), n("one1"), n("zero1"), n("axis_m2"))
    seen = [helper.make_node("Not", [ren.get(c, c)], [n("seen")])] if masked_if else [
        helper.make_node("Identity", [ren.get(c, c)], [n("seen")])]
    return [*rows, *seen,
            helper.make_node("Add", [n("b1"), n("s_minus_t")], [n("edge")]),
            # columns from the edge on (the last column when the edge is S: ReduceMax refuses an empty bool set)
            helper.make_node("Min", [n("edge"), n("s_minus_1")], [n("tail_start")]),
            helper.make_node("Slice", [n("seen"), n("tail_start"), n("S"), n("axis_m1")], [n("tail")]),
            helper.make_node("ReduceMax", [n("tail")], [n("sees_tail")], keepdims=0),
            helper.make_node("Slice", [n("seen"), n("zero1"), n("edge"), n("axis_m1")], [n("head")]),
            helper.make_node("ReduceMax", [n("head"), n("axis_m1")], [n("row_sees")], keepdims=0),
            helper.make_node("Not", [n("row_sees")], [n("blind")]),
            helper.make_node("ReduceMax", [n("blind")], [n("some_blind")], keepdims=0),
            helper.make_node("Or", [n("sees_tail"), n("some_blind")], [n("every_key")]),
            helper.make_node("Where", [n("every_key"), n("S"), n("edge")], [n("e")])]


def _row_sum_nodes(node, found, g: row_cone.Graph, prefix: str, block: int) -> list:
    """``ReduceSum(x, rows)`` as ``If(T > block, the sum of per-block sums, ReduceSum)``, ``x``'s cone recomputed per
    block: the [..., T, S] probabilities are never whole. When ``x`` is masked softmax probabilities (``_softmax_mask``)
    and its columns can be cut (``row_cone.column_tensors``), a block computes only the columns before its causal edge
    (``_edge_nodes``) and pads its sum with zeros to S."""
    from onnx import helper

    n = lambda s: f"{prefix}{s}"  # noqa: E731 - names local to this node
    x, axes = node.input
    leaves = row_cone.row_leaves(found, g)
    outer, body = _rows(prefix, n("T"), block)
    mask = _softmax_mask(found, g, x) if CAUSAL_COLUMNS else None
    cols = (row_cone.column_tensors(found, g, x) if mask is not None else None) or ()
    rank = len(g.dims.get(x) or [])
    cols = cols if rank >= 2 else ()  # the block's sum is padded back to S on its last axis
    if cols:
        outer += [_const(n("axis_m1"), [-1]), *(helper.make_node("Shape", [t], [n(f"cols{i}")], start=-1) for i, t in enumerate(cols)),
                  helper.make_node("Max", [n(f"cols{i}") for i in range(len(cols))], [n("S")]),
                  helper.make_node("Sub", [n("S"), n("T")], [n("s_minus_t")]),
                  helper.make_node("Sub", [n("S"), n("one1")], [n("s_minus_1")]),
                  _const(n("pads_head"), [0] * (2 * rank - 3))]
        body += _edge_nodes(found, g, mask, n)
    rows, ren = row_cone.rows_nodes(found, g, n("r_"), n("a1"), n("b1"), n("one1"), n("zero1"), n("axis_m2"),
                                    cols, n("e"), n("axis_m1"))
    part = n("part_e") if cols else n("part")
    body += [*_additive_masks(rows, g, n("r_")), helper.make_node("ReduceSum", [ren[x], axes], [part], keepdims=0)]
    if cols:
        body += [helper.make_node("Sub", [n("S"), n("e")], [n("pad_cols")]),
                 helper.make_node("Concat", [n("pads_head"), n("pad_cols")], [n("pads")], axis=0),
                 helper.make_node("Pad", [part, n("pads")], [n("part")])]  # exact zeros past the edge
    long_ = _branch([*_loop(prefix, n("trips"), body, n("part"), n("parts"), axis=None),
                     helper.make_node("ReduceSum", [n("parts"), n("zero1")], [n("blocked_y")], keepdims=0)],
                    n("blocked_y"), n("long"))
    full, fren = row_cone.rows_nodes(found, g, n("s_"))
    short = _branch([*_additive_masks(full, g, n("s_")), helper.make_node("ReduceSum", [fren[x], axes], [n("sum_y")], keepdims=0)], n("sum_y"),
                    n("short"))
    keepdims = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "keepdims"), 1)
    out = n("summed") if keepdims else node.output[0]
    nodes = [*(helper.make_node("Shape", [leaf], [n(f"rows{i}")], start=-2, end=-1) for i, leaf in enumerate(leaves)),
             helper.make_node("Max", [n(f"rows{i}") for i in range(len(leaves))], [n("T")]), *outer,
             helper.make_node("If", [n("long")], [out], name=n("if_long"), then_branch=long_, else_branch=short)]
    if keepdims:
        nodes.append(helper.make_node("Unsqueeze", [out, axes], [node.output[0]]))
    return nodes


def rewrite(model, block: int | None = None, grouped: bool | None = None) -> int:
    """Rewrite ``model`` (a ModelProto, changed in place) as the module docstring says; returns how many Attention
    nodes now run in query blocks of ``block`` rows (default ``BLOCK``) when a step has more. ``grouped`` (default
    ``decode_attention.ENABLED``): a one-row step runs ``decode_attention``'s grouped MatMuls."""
    block = BLOCK if block is None else int(block)
    if block < 1:
        raise ValueError(f"prompt_attention block must be >= 1 query rows; got {block}")
    grouped = decode_attention.ENABLED if grouped is None else grouped
    graph = model.graph
    types = _types(graph)
    used = {i for nd in graph.node for i in nd.input} | {o.name for o in graph.output}
    g, new, cones, count = None, [], set(), 0
    for node in graph.node:
        if node.op_type == "ReduceSum" and types.get(node.input[0]) is None:  # inlined colsum: no value_info of its own
            g = g or row_cone.Graph(model)
            found = _row_sum_cone(node, g)
            if found is not None:
                cones |= {o for nd in found[0] for o in nd.output}
                new.extend(_row_sum_nodes(node, found, g, f"gw_prompt_rowsum{count}_", block))
                count += 1
                continue
        if _eligible(node, types, used) is not None or types[node.input[0]][1][2] == 1:
            new.append(node)
            continue
        g = g or row_cone.Graph(model)
        found = row_cone.cone(node.input[3], g) or ([], [node.input[3]])  # no cone: the mask itself sliced per block
        cones |= {o for nd in found[0] for o in nd.output}
        new.extend(_attention_nodes(node, found, g, f"gw_prompt_attention{count}_", block, grouped))
        count += 1
    if count:
        row_cone.replace_nodes(graph, new, cones)
    return count


def anchors(model) -> set:
    """The main-graph nodes ``rewrite`` made to run each layer's attention (an ``If`` on T == 1 or T > BLOCK), for
    ``state_order``."""
    return {nd.name for nd in model.graph.node if nd.op_type == "If" and nd.name.startswith("gw_prompt_attention")}
