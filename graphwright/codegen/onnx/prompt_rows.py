"""A long prompt step's row-wise residual branches (the MLP) in blocks of rows, at load time.

Why. After ``prompt_attention`` and ``state_order``, the largest tensors of an evicting artifact's one-shot prompt
step are the MLP's: SmolLM2-135M's gate, up and SiLU products are [1, T, 1536] fp32, 47 MB each at an 8,064-token
prompt, three of them alive at once in every layer (a simulation of ONNX Runtime's own execution order put the step's
live peak there). Every op of the branch works on one token row at a time, so the rows can be computed in blocks.

What. ``rewrite(model)`` finds each ``Add(x, y)`` whose ``y`` is made from ``x`` alone by row-wise nodes
(``row_cone.cone``: elementwise ops, last-axis norms, MatMul by a weight; at least one MatMul) - a residual branch
such as ``x + down(silu(gate(norm(x))) * up(norm(x)))`` - and replaces it with::

    ConcatFromSequence(Loop(ceil(T / BLOCK)) { the branch on rows a..b of x, plus x's rows }, axis=-2)

(``prompt_attention._rows`` / ``_loop``). The same ops on the same rows: bit for bit. One copy of the branch, in the
loop: a copy in an ``If`` branch for short steps would give ONNX Runtime a second MatMul kernel per weight, each
prepacking its own copy (+320 MB for SmolLM2-135M, measured), so a short step runs one iteration instead. Only for a
graph that runs prompt steps alone (``model.onnx`` of an artifact with a ``decode.onnx``): a dense artifact's
``model.onnx`` also runs its one-token steps, which would pay the loop per layer for nothing (its prompt chunks, 512
tokens, are below BLOCK anyway).

Tested (``tests/onnx/test_prompt_attention.py::test_mlp_rows_in_blocks_give_the_same_step``): a tiny Llama artifact's
prompt step with blocks of 4 rows, the rewrite off and on: the same logits, states and tokens bit for bit; every
layer's MLP residual rewritten, and the attention's residual (whose branch reads the attention output) not.
"""

from __future__ import annotations

from . import row_cone
from .prompt_attention import _loop, _rows

ENABLED = True  # False: the MLP of a long prompt step runs on every row at once (A/B: bench/peak_rss.py --prompt-rows off)
BLOCK = 1024  # rows per block: 6 MB per [rows, 1536] fp32 MLP tensor


def _branch_cone(node, g: row_cone.Graph):
    """``(x, cone)`` when ``node`` is ``Add(x, y)`` with ``y`` a row-wise function of ``x`` holding a MatMul; else None."""
    if node.op_type != "Add" or len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
        return None
    for x in node.input:
        dims = g.dims.get(x)
        if not dims or len(dims) < 2 or dims[-2] == 1:
            continue
        found = row_cone.cone(node.output[0], g, stop=lambda name, x=x: name == x)
        if found is None or row_cone.row_leaves(found, g) != [x]:
            continue
        if any(nd.op_type == "MatMul" for nd in found[0]):
            return x, found
    return None


def _blocked(node, x: str, found, g: row_cone.Graph, prefix: str, block: int) -> list:
    from onnx import helper

    n = lambda s: f"{prefix}{s}"  # noqa: E731 - names local to this branch
    outer, body = _rows(prefix, n("T"), block)
    rows, ren = row_cone.rows_nodes(found, g, n("r_"), n("a1"), n("b1"), n("one1"), n("zero1"), n("axis_m2"))
    return [helper.make_node("Shape", [x], [n("T")], start=-2, end=-1), *outer,
            *_loop(prefix, n("trips"), body + rows, ren[node.output[0]], node.output[0], axis=-2)]


def rewrite(model, block: int | None = None) -> int:
    """Rewrite ``model`` (a ModelProto, in place) as the module docstring says; returns how many residual branches now
    run in blocks of ``block`` rows (default ``BLOCK``) when a step has more."""
    block = BLOCK if block is None else int(block)
    if block < 1:
        raise ValueError(f"prompt_rows block must be >= 1 rows; got {block}")
    g = row_cone.Graph(model)
    graph = model.graph
    new, cones, count = [], set(), 0
    for node in graph.node:
        found = _branch_cone(node, g)
        if found is None:
            new.append(node)
            continue
        x, cone = found
        cones |= {o for nd in cone[0] for o in nd.output}
        new.extend(_blocked(node, x, cone, g, f"gw_prompt_rows{count}_", block))
        count += 1
    if count:
        row_cone.replace_nodes(graph, new, cones)
    return count
