"""Lowering transform: one node for identical ``unsqueeze``/``expand`` views in a step graph.

Every layer of a captured step graph repeats a few views of tensors computed once per step: the
eviction layers' new key position (``positions.unsqueeze(1).expand(-1, Hk, -1)``, appended to each
layer's ``key_positions``) and the RoPE cos/sin rows (``cos.unsqueeze(1)``). Eager, each is a
dispatched aten op per layer and step (4 per layer for SmolLM2's H2O and StreamingLLM layers, 2 for
dense ones). A view of the same tensor with the same arguments is the same values over the same
memory, so this transform keeps the first such node and points the users of the others at it
(common-subexpression elimination restricted to these two view ops; nothing else is merged).

Exact: the values every op reads are unchanged (a view aliases its input either way; no op writes
through these views: ``cache_append`` copies its ``new`` argument). Tested
(``tests/codegen/test_shared_views.py``): an H2O and a StreamingLLM graph lowered for the torch
backend keep one ``unsqueeze``/``expand`` of ``positions`` instead of one per layer and decode the
same logits and kept sets as without the transform.
"""

from __future__ import annotations

import torch

VIEW_OPS = (torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default)


def _key(node: torch.fx.Node):
    def norm(a):
        if isinstance(a, torch.fx.Node):
            return ("node", id(a))
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, (int, float, bool, str, type(None))):
            return a
        raise TypeError
    try:
        return node.target, norm(node.args), norm(tuple(sorted(node.kwargs.items())))
    except TypeError:
        return None


def share_views(graph: torch.fx.Graph) -> None:
    """Replace every ``unsqueeze``/``expand`` node identical to an earlier one (same input node, same
    arguments) by that earlier node. Runs to a fixed point in one pass: nodes are visited in order, so an
    ``expand`` of a merged ``unsqueeze`` already names the kept node."""
    seen: dict = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in VIEW_OPS:
            continue
        key = _key(node)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
    graph.lint()
