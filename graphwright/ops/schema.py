"""The attention-op schema: every graphwright attention variant's arguments, by name, in one place.

Passes never index an attention node's ``args`` by position. They read and write arguments by
name through ``get``/``set``, which take the names and defaults from the op's registered
``torch.library`` signature (the one declaration of the op's arguments), so adding an argument
to an op never shifts an index somewhere else. The attention variants are:

* ``graphwright.attention``             (q, k, v, q_pos, k_pos, scale, window, key_bias, sinks)
* ``graphwright.latent_attention``      (q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq,
                                         rope_scaling, scale, window, key_bias, sinks)
* ``graphwright.block_sparse_attention``(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill, page_a, page_b,
                                         key_bias)

Invariant tested (``tests/ops/test_schema.py``): ``get`` after ``set`` returns the value whether the
argument was positional, a keyword or defaulted; the node still runs; no module outside this one
indexes an attention node's arguments by position (a source scan).
"""

from __future__ import annotations

import torch

from ..capture.ops import ATTENTION
from .block_sparse import BLOCK_SPARSE_ATTENTION
from .latent_attention import LATENT_ATTENTION

ATTENTION_OPS = (ATTENTION, LATENT_ATTENTION, BLOCK_SPARSE_ATTENTION)
_MISSING = object()


def arg_names(target) -> tuple[str, ...]:
    """The op's argument names in declaration order (from its torch.library schema)."""
    return tuple(a.name for a in target._schema.arguments)


def has_arg(target, name: str) -> bool:
    return name in arg_names(target)


def _default(target, name: str):
    for a in target._schema.arguments:
        if a.name == name:
            return a.default_value if a.has_default_value() else _MISSING
    raise KeyError(f"{target} has no argument {name!r}; its arguments: {', '.join(arg_names(target))}")


def get(node: torch.fx.Node, name: str, default=_MISSING):
    """Argument ``name`` of a graphwright op node (positional, keyword or the op's default)."""
    names = arg_names(node.target)
    if name not in names:
        if default is not _MISSING:
            return default
        raise KeyError(f"{node.target} has no argument {name!r}; its arguments: {', '.join(names)}")
    i = names.index(name)
    if i < len(node.args):
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    d = _default(node.target, name)
    if d is _MISSING:
        raise KeyError(f"{node.name}: required argument {name!r} is missing")
    return d


def set(node: torch.fx.Node, name: str, value) -> None:  # noqa: A001 - the accessor pair is get/set
    """Write argument ``name`` (in place if it is positional, as a keyword otherwise)."""
    names = arg_names(node.target)
    if name not in names:
        raise KeyError(f"{node.target} has no argument {name!r}; its arguments: {', '.join(names)}")
    i = names.index(name)
    if i < len(node.args):
        node.update_arg(i, value)
    else:
        node.update_kwarg(name, value)


def bound(node: torch.fx.Node) -> dict:
    """Every argument of the node by name (defaults filled in)."""
    return {name: get(node, name) for name in arg_names(node.target)}


def call(graph: torch.fx.Graph, target, **values) -> torch.fx.Node:
    """Insert ``target(**values)`` with required arguments positional and the rest as keywords.

    Raises ``KeyError`` naming an unknown or missing argument.
    """
    names = arg_names(target)
    unknown = [k for k in values if k not in names]
    if unknown:
        raise KeyError(f"{target} has no argument {unknown[0]!r}; its arguments: {', '.join(names)}")
    args, kwargs = [], {}
    for a in target._schema.arguments:
        if a.has_default_value():
            if a.name in values:
                kwargs[a.name] = values[a.name]
        elif a.name in values:
            args.append(values[a.name])
        else:
            raise KeyError(f"{target}: required argument {a.name!r} not given")
    return graph.call_function(target, tuple(args), kwargs)


def is_attention(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ATTENTION_OPS


def attention_nodes(gm: torch.fx.GraphModule) -> list:
    """Every attention node (any variant), in graph order."""
    return [n for n in gm.graph.nodes if is_attention(n)]


def layer_of(node) -> int | None:
    return (node.meta.get("graphwright") or {}).get("layer")
