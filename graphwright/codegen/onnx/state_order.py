"""Each layer's state written before the next layer's attention runs: a load-time ordering for long prompt steps.

Why. ONNX Runtime runs a graph in an order of its own choosing among the topological ones, and in an evicting
artifact's prompt step it left the nodes that write each layer's kept slots (``prompt_slots.py``: a TopK and gathers
over the layer's whole K/V) until the end of the graph. Every layer's whole-prompt K and V then stayed alive until
then: on SmolLM2-135M's 8,064-token StreamingLLM prompt step, 30 x 11.8 MB, and the step's resident peak grew by
~13 MB per layer to +0.9 GB (a simulation of ONNX Runtime's own order from its profile still had those K/V
concatenations alive near the peak; ``bench/peak_rss.py`` measures the effect).

What. ``rewrite(model, anchors)``: for every graph output that the main graph computes before an anchor node (the
attention nodes ``prompt_attention`` wrote, in graph order), the first such anchor after it gets a data dependency on
it. The anchor's first input is a boolean (an ``If`` condition) and becomes ``Or(cond, never(output))``, where
``never`` is one element of the output compared with +inf (false for every value, NaN included: the same trick as
``decode_rows.after``) - an input no optimizer folds, so the output's nodes must run before the anchor. An empty
output reduces to a sum of 0, also never above +inf. Values are unchanged; only the order is constrained.

Tested (``tests/onnx/test_prompt_attention.py``): the artifacts give the same kept positions, states and logits with
the ordering on and off, and each anchor reads the outputs computed before it.
"""

from __future__ import annotations

ENABLED = True  # False: ONNX Runtime orders a prompt step's state writes itself (A/B: bench/peak_rss.py --state-order off)


def _never(prefix: str, name: str) -> tuple[list, str]:
    """Nodes giving a bool scalar that is false and depends on ``name``'s first element."""
    from onnx import TensorProto, helper

    n = lambda s: f"{prefix}{s}"  # noqa: E731 - names local to this output
    nodes = [
        helper.make_node("Constant", [], [n("flat_shape")], value=helper.make_tensor(n("flat_shape"), TensorProto.INT64, [1], [-1])),
        helper.make_node("Constant", [], [n("zero")], value=helper.make_tensor(n("zero"), TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], [n("one")], value=helper.make_tensor(n("one"), TensorProto.INT64, [1], [1])),
        helper.make_node("Constant", [], [n("inf")], value=helper.make_tensor(n("inf"), TensorProto.FLOAT, [], [float("inf")])),
        helper.make_node("Reshape", [name, n("flat_shape")], [n("flat")]),
        helper.make_node("Slice", [n("flat"), n("zero"), n("one")], [n("first")]),
        helper.make_node("Cast", [n("first")], [n("first_f")], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", [n("first_f")], [n("value")], keepdims=0),
        helper.make_node("Greater", [n("value"), n("inf")], [n("never")]),
    ]
    return nodes, n("never")


def rewrite(model, anchors: set) -> int:
    """Constrain ``model``'s main graph in place (module docstring); ``anchors``: names of nodes whose first input is a
    bool condition. Returns how many outputs now come before an anchor."""
    from onnx import helper

    graph = model.graph
    index = {o: i for i, nd in enumerate(graph.node) for o in nd.output}
    at = [i for i, nd in enumerate(graph.node) if nd.name in anchors]
    waits: dict[int, list] = {}
    for out in graph.output:
        i = index.get(out.name)
        nxt = next((a for a in at if i is not None and a > i), None)
        if nxt is not None:
            waits.setdefault(nxt, []).append(out.name)
    if not waits:
        return 0
    new, count = [], 0
    for i, node in enumerate(graph.node):
        if i in waits:
            cond = node.input[0]
            for name in waits[i]:
                nodes, never = _never(f"gw_state_order{count}_", name)
                joined = f"gw_state_order{count}_cond"
                new += [*nodes, helper.make_node("Or", [cond, never], [joined])]
                cond, count = joined, count + 1
            node.input[0] = cond
        new.append(node)
    del graph.node[:]
    graph.node.extend(new)
    return count
