"""The query rows a..b of a tensor, recomputed from the rows of what it is made of: ONNX graph surgery for blocking.

A step graph's masks and score matrices have the query rows on axis -2 ([..., T, S]). ``prompt_attention.py`` runs
a long prompt step in blocks of rows; to hold one block of such a tensor at a time, and not the whole one sliced, the
nodes that make it are copied into the block's loop body with their row-bearing inputs sliced to the block.

``cone(target, ...)`` walks back from ``target`` through **row-wise** nodes, whose output row r depends only on row r
of their row-bearing inputs:

* elementwise ops (``ELEMENTWISE``) under numpy broadcasting: an input of rank >= 2 has its rows on axis -2, or a 1
  there (broadcast); a lower-rank input has no row axis;
* ``Softmax`` / ``LogSoftmax`` over the last axis;
* ``MatMul``: its output rows are input 0's rows (input 1, the keys, is read whole);
* ``RMSNormalization`` / ``LayerNormalization`` over the last axis (one output: no saved statistics);
* ``Unsqueeze`` of new axes before the last two;
* ``Reshape`` by a constant shape that copies the last two axes (``0, 0`` with ``allowzero`` 0, the same rank in and
  out): ``[B, Hk, T, S] -> [-1, 1, 0, 0]`` folds heads into the batch.

Anything else is a **leaf**: read from the enclosing graph (ONNX subgraphs see outer values) and sliced on axis -2 when
its rank is >= 2 and that axis is not statically 1 (at run time ``Where(dim > 1, rows a..b, the broadcast row)``: in a
row-wise op an operand's axis -2 is either the rows or 1). Ranks come from ONNX shape inference; a leaf of unknown rank
makes the cone unusable (``None``).

``rows_nodes(cone, ...)`` emits the copy: the cone's nodes renamed with a prefix, the leaves sliced to rows
[a, b) (``a1``/``b1`` are 1-element int64 tensors). The result equals ``target[..., a:b, :]`` element for element: the
same ops on the same values.
"""

from __future__ import annotations

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "And", "Or", "Xor", "Not", "Equal", "Less", "LessOrEqual", "Greater",
               "GreaterOrEqual", "Cast", "Neg", "Exp", "Log", "Max", "Min", "Sigmoid", "Tanh", "Abs", "Sqrt", "Pow",
               "Reciprocal", "Identity", "IsNaN", "IsInf"}


class Graph:
    """A main graph's producers, constants and inferred ranks / axis -2 dims, for ``cone``."""

    def __init__(self, model):
        import onnx

        inferred = onnx.shape_inference.infer_shapes(model).graph
        self.producer = {o: nd for nd in model.graph.node for o in nd.output}
        self.consts = {i.name: i for i in model.graph.initializer}
        for nd in model.graph.node:
            if nd.op_type == "Constant" and nd.attribute and nd.attribute[0].name == "value":
                self.consts[nd.output[0]] = nd.attribute[0].t
        self.dims: dict[str, list] = {}
        for v in [*inferred.input, *inferred.value_info, *inferred.output]:
            t = v.type.tensor_type
            if t.HasField("shape"):
                self.dims[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        for name, t in self.consts.items():
            self.dims[name] = list(t.dims)

    def const_values(self, name):
        """The values of a small constant (a Reshape target), or None."""
        from onnx import numpy_helper

        t = self.consts.get(name)
        if t is None or t.data_location == 1:  # external data: a weight, not a shape
            return None
        return [int(x) for x in numpy_helper.to_array(t).reshape(-1)]


def _row_inputs(node, g: Graph):
    """The inputs of a row-wise ``node`` that carry rows (walked or sliced), or None when the node is not row-wise."""
    from onnx import helper

    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op in ELEMENTWISE:
        return [i for i in node.input if i]
    if op in ("Softmax", "LogSoftmax"):
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        rank = len(g.dims.get(node.input[0]) or [])
        return [node.input[0]] if axis == -1 or (rank and axis == rank - 1) else None
    if op == "MatMul":
        return [node.input[0]]
    if op in ("RMSNormalization", "LayerNormalization"):  # over the last axis only: its scale/bias have no row axis
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        rank = len(g.dims.get(node.input[0]) or [])
        return [node.input[0]] if len(node.output) == 1 and (axis == -1 or (rank and axis == rank - 1)) else None
    if op == "Unsqueeze":  # new axes before the last two: rows and columns stay the last two axes
        axes, rank_in = g.const_values(node.input[1]) if len(node.input) > 1 else None, g.dims.get(node.input[0])
        if axes is None or rank_in is None:
            return None
        rank = len(rank_in) + len(axes)
        return [node.input[0]] if len(rank_in) >= 2 and all((a % rank) < rank - 2 for a in axes) else None
    if op == "Reshape":
        allowzero = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "allowzero"), 0)
        shape = g.const_values(node.input[1]) if len(node.input) > 1 else None
        rank_in = g.dims.get(node.input[0])
        if allowzero or shape is None or rank_in is None or len(shape) != len(rank_in) or shape[-2:] != [0, 0]:
            return None
        return [node.input[0]]
    return None


def cone(target: str, g: Graph, stop=lambda name: False):
    """``(nodes in topological order, leaves)`` of the row-wise subgraph that makes ``target``; None when a leaf's rank
    is unknown. ``stop(name)``: treat that tensor as a leaf."""
    nodes, leaves, seen = [], [], set()

    def walk(name):
        if name in seen:
            return True
        seen.add(name)
        node = g.producer.get(name)
        rows = None if node is None or stop(name) or node.op_type == "Constant" else _row_inputs(node, g)
        if rows is None:
            if g.dims.get(name) is None:
                return False
            leaves.append(name)
            return True
        if not all(walk(i) for i in rows):
            return False
        nodes.append(node)
        return True

    return (nodes, leaves) if walk(target) else None


def row_leaves(found, g: Graph) -> list:
    """The leaves of a cone that may carry rows (rank >= 2, axis -2 not statically 1)."""
    return [leaf for leaf in found[1] if len(g.dims[leaf]) >= 2 and g.dims[leaf][-2] != 1]


def rows_nodes(found, g: Graph, prefix: str, a1: str | None = None, b1: str | None = None, one1: str = "",
               zero1: str = "", axis_m2: str = "", cols: tuple = (), e1: str = "", axis_m1: str = "") -> tuple[list, dict]:
    """The nodes that compute the cone's tensors for rows [a1, b1) inside a loop body, or (``a1`` None) for every
    row, a renamed copy for a branch; returns ``(nodes, renamed)``, ``renamed[name]`` the copy's name of a cone tensor
    (the target among them). ``one1``/``zero1``/``axis_m2``: names of int64 constants [1], [0] and [-2] the body can
    read. ``cols``: tensors read (after their rows are sliced) only in columns [0, ``e1``) of their last axis
    (``column_tensors``; ``axis_m1`` names an int64 [-1]): the copy then computes only those columns of the target."""
    from onnx import helper

    nodes, leaves = found
    rename, out = {}, []
    for leaf in (leaves if a1 is not None else []):
        dims = g.dims[leaf]
        if len(dims) < 2 or dims[-2] == 1:
            continue  # no row axis, or a broadcast row: read whole
        p = f"{prefix}{leaf}_"
        if dims[-2] is not None and dims[-2] > 1:  # the rows, statically
            start, end = a1, b1
        else:
            out += [helper.make_node("Shape", [leaf], [p + "d"], start=-2, end=-1),
                    helper.make_node("Greater", [p + "d", one1], [p + "is_rows"]),
                    helper.make_node("Where", [p + "is_rows", a1, zero1], [p + "start"]),
                    helper.make_node("Where", [p + "is_rows", b1, one1], [p + "end"])]
            start, end = p + "start", p + "end"
        out.append(helper.make_node("Slice", [leaf, start, end, axis_m2], [p + "rows"]))
        rename[leaf] = p + "rows"
    for name in cols:  # columns [0, e1): a broadcast (size 1) last axis stays whole, as Slice clamps the end to it
        out.append(helper.make_node("Slice", [rename.get(name, name), zero1, e1, axis_m1], [f"{prefix}{name}_cols"]))
        rename[name] = f"{prefix}{name}_cols"
    for node in nodes:
        copy = helper.make_node(node.op_type, [rename.get(i, i) if i else "" for i in node.input],
                                [f"{prefix}{o}" if o else "" for o in node.output], domain=node.domain)
        copy.attribute.extend(node.attribute)
        for o in node.output:
            if o:
                rename[o] = f"{prefix}{o}"
        out.append(copy)
    return out, rename


def column_tensors(found, g: Graph, target: str):
    """The tensors from outside the cone whose last axis becomes ``target``'s last axis (its columns): walked back
    through elementwise ops (every input), a last-axis ``Softmax``, ``MatMul`` (input 1: the keys' columns; input 0's
    last axis is summed over), ``Unsqueeze`` and ``Reshape``; those of rank >= 1 whose last axis is not statically 1.
    None when a node mixes columns otherwise (a last-axis normalisation, ``LogSoftmax``), a tensor cut to its columns is
    also read where its last axis is not the columns (MatMul's input 0, a node outside the column path), or a rank is
    unknown."""
    nodes = found[0]
    made = {o for nd in nodes for o in nd.output}
    col, out, reads_of = {target}, [], {}
    for nd in reversed(nodes):
        if nd.output[0] not in col:
            continue
        if nd.op_type in ELEMENTWISE:
            reads = [i for i in nd.input if i]
        elif nd.op_type in ("Softmax", "Unsqueeze", "Reshape"):
            reads = [nd.input[0]]
        elif nd.op_type == "MatMul":
            reads = [nd.input[1]]
        else:
            return None
        reads_of[id(nd)] = set(reads)
        col.update(reads)
    if any(i in col and i not in reads_of.get(id(nd), ()) for nd in nodes for i in nd.input if i):
        return None
    for name in sorted(col - made):
        dims = g.dims.get(name)
        if dims is None:
            return None
        if dims and dims[-1] != 1:
            out.append(name)
    return out


def drop_unused(nodes: list, graph_outputs: set, candidates: set) -> list:
    """``nodes`` (a main graph's, in order) without the nodes that write a ``candidates`` name and none of whose outputs
    is read any more (by a node, a subgraph or a graph output), repeatedly. Other dead nodes stay."""
    while True:
        read = set(graph_outputs) | _reads(nodes)
        keep = [n for n in nodes if not (set(n.output) & candidates) or any(o in read for o in n.output if o)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def replace_nodes(graph, nodes: list, candidates: set) -> None:
    """Set ``graph``'s nodes to ``nodes`` after ``drop_unused`` (a rewrite's cone nodes that nothing reads any more)."""
    nodes = drop_unused(nodes, {o.name for o in graph.output}, candidates)
    del graph.node[:]
    graph.node.extend(nodes)


def _reads(nodes) -> set:
    """Every value the nodes read, their subgraphs' reads included."""
    out = set()
    for n in nodes:
        out.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == a.GRAPH:
                out |= _reads(a.g.node) | {o.name for o in a.g.output}
            for sub in a.graphs:
                out |= _reads(sub.node) | {o.name for o in sub.output}
    return out
