"""Facts about FX nodes that every inspection tool needs: which layer, which module, what shapes.

Report, diff, networkx export and HTML rendering all group nodes by layer and show shapes;
doing it in one place keeps them consistent (a node is in the same layer everywhere).
"""

from __future__ import annotations

import re

import torch

_PREFIX = "hf."
# "model.layers.3", "transformer.h.3", "model.decoder.layers.3", "blocks.3" ...
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")
_NUM_FIXED_INPUTS = 3  # input_ids, positions, logits_index precede the state placeholders


def unwrap(obj):
    """``(GraphModule, StepGraph or None)`` for a CompiledModel, StepGraph or GraphModule."""
    sg = getattr(obj, "step_graph", None)
    if sg is None and hasattr(obj, "gm") and hasattr(obj, "state"):
        sg = obj
    if sg is not None:
        return sg.gm, sg
    if isinstance(obj, torch.fx.GraphModule):
        return obj, None
    raise TypeError(f"expected a CompiledModel, StepGraph or torch.fx.GraphModule; got {type(obj).__name__}")


def strip_prefix(path: str) -> str:
    """Module paths relative to the HF model (capture wraps it as ``hf``)."""
    return path[len(_PREFIX):] if path.startswith(_PREFIX) else path


def layer_from_path(path: str) -> int | None:
    m = _LAYER_RE.search(path or "")
    return int(m.group(1)) if m else None


def gw_meta(node: torch.fx.Node) -> dict:
    """``node.meta['graphwright']`` (op, layer, module, variant) or ``{}``."""
    return node.meta.get("graphwright") or {}


def module_path(node: torch.fx.Node) -> str:
    """The innermost HF module the node came from ("" when unknown)."""
    meta = gw_meta(node)
    if meta.get("module"):
        return meta["module"]
    if node.op == "get_attr":
        return strip_prefix(str(node.target)).rsplit(".", 1)[0]
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return strip_prefix(list(stack.values())[-1][0])
    return ""


def state_layers(gm: torch.fx.GraphModule, sg=None) -> dict:
    """Placeholder name -> layer for the cache placeholders (state is threaded in order)."""
    if sg is None:
        return {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = {}
    for node, spec in zip(placeholders[_NUM_FIXED_INPUTS:], sg.state):
        if spec.layer is not None:
            out[node.name] = spec.layer
    return out


def node_layer(node: torch.fx.Node, placeholder_layers: dict | None = None):
    """The decoder layer a node belongs to, or ``None`` for model-level nodes (embeddings, head)."""
    meta = gw_meta(node)
    if meta.get("layer") is not None:
        return int(meta["layer"])
    if node.op == "placeholder":
        return (placeholder_layers or {}).get(node.name)
    if node.op == "get_attr":
        return layer_from_path(str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        layer = layer_from_path(path)
        if layer is not None:
            return layer
    return None


def layer_map(obj) -> dict:
    """Node -> layer (or None) for every node of a CompiledModel / StepGraph / GraphModule."""
    gm, sg = unwrap(obj)
    ph = state_layers(gm, sg)
    return {n: node_layer(n, ph) for n in gm.graph.nodes}


def _dim(d):
    try:
        return int(d)
    except (TypeError, ValueError):
        return str(d)  # a symbolic size such as s17 (batch) or s18 (sequence)


def _tensors(val):
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _tensors(v)]
    return []


def node_shapes(node: torch.fx.Node) -> list:
    """Shapes of the node's output tensors (symbolic sizes as strings), from ``meta['val']``."""
    return [[_dim(d) for d in t.shape] for t in _tensors(node.meta.get("val"))]


def node_dtype(node: torch.fx.Node) -> str | None:
    ts = _tensors(node.meta.get("val"))
    return str(ts[0].dtype).replace("torch.", "") if ts else None


def format_shapes(shapes: list) -> str:
    return ", ".join("[" + ", ".join(str(d) for d in s) + "]" for s in shapes)


def target_name(node: torch.fx.Node) -> str:
    """A readable target: ``aten.linear.default``, ``graphwright.attention.default``, a param path."""
    t = node.target
    if isinstance(t, str):
        return strip_prefix(t) if node.op == "get_attr" else t
    name = str(t)
    if name.startswith("<"):
        name = getattr(t, "__qualname__", None) or getattr(t, "__name__", name)
    return name


def is_graphwright(node: torch.fx.Node) -> bool:
    """True for graphwright's own ops (attention, MoE experts and whatever passes add)."""
    return bool(gw_meta(node)) or target_name(node).startswith("graphwright.")
