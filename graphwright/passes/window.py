"""``window``: sliding-window attention with attention sinks, as a mask only (no eviction).

Based on StreamingLLM (arXiv:2309.17453): a query sees the first ``sinks`` positions plus the
last ``size`` positions up to itself. Unlike ``streaming`` nothing leaves the cache and RoPE
positions are untouched: this is the attention *pattern* alone, for the layers or heads chosen.

Graph change. Whole layers: the layer's ``graphwright.attention`` node gets ``window=size`` and
``sinks=sinks`` (its ``sinks`` argument; one node kind, so every backend picks its kernel from the
arguments). Chosen heads of a layer (``heads={layer: [query heads]}``): the node is split into two
``graphwright.attention`` nodes over ``index_select``-ed query heads (and their KV heads: whole
GQA groups keep their grouping, partial groups use one KV head per query head), one windowed
and one dense, whose outputs are concatenated and put back in head order.

Arguments: ``size`` (required, >= 1), ``sinks`` (default 4), ``layers`` (default all) or
``heads``. Layers that already have a sliding window (Gemma-3's and Mistral's native windows, or
an earlier window pass) are left alone when the user did not name layers (the default "all"),
and ``sg.notes["window"]["skipped"]`` says which and why; naming only such layers, or a model
whose every layer has a window, raises RecipeError. Exact setting: ``size >= sequence length``
(every key is inside the window).
Invariants tested (``tests/passes/test_window.py``, ``tests/models/test_gemma3.py``): size >=
length gives identity logits and greedy tokens (tiny-gemma3: its sliding layer skipped, noted);
a windowed layer equals a naive masked-softmax oracle; head splitting leaves the unselected heads
bit-identical; bad layers / heads / an already-windowed model raise RecipeError.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..capture.ops import ATTENTION
from ..errors import RecipeError
from ..ops import schema
from .base import MAX_TOKENS, Arg, Pass, PassContext, register_pass
from .selection import parse_layer_heads

aten = torch.ops.aten


def _set_window(node, size: int, sinks: int):
    schema.set(node, "window", size)
    if sinks:
        schema.set(node, "sinks", sinks)


def _by_layer(sg) -> dict:
    return {schema.layer_of(n): n for n in sg.nodes(ATTENTION)}


def native_windows(sg, op=ATTENTION) -> dict:
    """``{layer: window}`` for the attention nodes that already have a sliding window."""
    return {schema.layer_of(n): schema.get(n, "window") for n in sg.nodes(op) if schema.get(n, "window")}


def skip_note(window: int) -> str:
    return f"native sliding window of {window}"


def parse_selection(layers, heads, num_layers: int, num_heads: int) -> dict:
    """``{layer: None (whole layer) | sorted query heads}`` (``selection.parse_layer_heads``)."""
    return parse_layer_heads("window", num_layers, num_heads, layers=layers, heads=heads,
                             heads_form="a non-empty {layer: [query heads]} mapping")


@register_pass
class Window(Pass):
    name = "window"
    needs = frozenset({"dense_attention", "shared_positions"})
    produces = frozenset({"window"})
    excludes = {"block_sparse": "both decide which keys a query sees (a window or top-k blocks); give them different layers"}
    stage = 20
    examples = {"exact": "window(size=1000)", "lossy": "window(size=6, sinks=2)", "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3")}
    exact = False
    doc = "Sliding-window attention with attention sinks (masking only) for chosen layers or heads."
    args = (
        Arg("size", int, None, "window length in tokens (the query and size-1 earlier positions)", min=1, max=MAX_TOKENS, required=True),
        Arg("sinks", int, 4, "first positions every query always sees (attention sinks)", min=0, max=MAX_TOKENS),
        Arg("layers", list, None, "layers to window (default: all)"),
        Arg("heads", Mapping, None, "{layer: [query heads]} to window only those heads"),
    )

    def __init__(self, **values):
        super().__init__(**values)
        if self.heads is not None:  # a per-head window splits the layer's attention node
            self.produces = frozenset({"window", "head_split"})

    def layer_set(self, info) -> set | None:
        if self.heads is not None and isinstance(self.heads, Mapping):
            return {int(k) for k in self.heads if str(k).lstrip("-").isdigit()}
        return super().layer_set(info)

    def applies_to(self, sg) -> str | None:
        nodes = sg.nodes(ATTENTION)
        if not nodes:
            return "the graph has no graphwright.attention nodes to window"
        native = native_windows(sg)
        if len(native) == len(nodes):
            return (f"every layer already has a sliding window ({native}) from the model or an earlier window "
                    "pass; window applies to layers without one")
        return None

    def run(self, sg, ctx: PassContext):
        info = sg.info
        sel = parse_selection(self.layers, self.heads, info.num_layers, info.num_heads)
        by_layer = _by_layer(sg)
        missing = [layer for layer in sel if layer not in by_layer]
        if missing:
            raise RecipeError(f"window: layer(s) {missing} have no graphwright.attention node "
                              f"(layers with one: {sorted(k for k in by_layer if k is not None)})")
        native = native_windows(sg)
        skipped = {layer: skip_note(native[layer]) for layer in sel if layer in native}
        if skipped and len(skipped) == len(sel):
            free = sorted(k for k in by_layer if k is not None and k not in native)
            raise RecipeError(f"window: layer(s) {sorted(skipped)} already have a sliding window "
                              f"({', '.join(f'{k}: {native[k]}' for k in sorted(skipped))}); "
                              f"layers without one: {free}")
        sel = {layer: hs for layer, hs in sel.items() if layer not in skipped}
        per_layer = {}
        for layer, hs in sel.items():
            node = by_layer[layer]
            if hs is None:
                _set_window(node, self.size, self.sinks)
                node.meta.setdefault("graphwright", {})["variant"] = "window"
                per_layer[layer] = {"size": self.size, "sinks": self.sinks, "heads": "all"}
            else:
                _split_heads(sg, node, hs, self.size, self.sinks)
                per_layer[layer] = {"size": self.size, "sinks": self.sinks, "heads": hs}
        sg.gm.graph.lint()
        sg.gm.recompile()
        windowed = dict(per_layer)
        per_layer.update({layer: {"skipped": why} for layer, why in skipped.items()})  # shown by cm.report()
        sg.notes["window"] = {
            "per_layer": dict(sorted(per_layer.items())),
            "counts": {"layers_windowed": sum(1 for v in windowed.values() if v["heads"] == "all"),
                       "layers_split": sum(1 for v in windowed.values() if v["heads"] != "all"),
                       "heads_windowed": sum(info.num_heads if v["heads"] == "all" else len(v["heads"]) for v in windowed.values()),
                       "layers_skipped": len(skipped)},
            "settings": {"size": self.size, "sinks": self.sinks, "masking_only": True},
            "show": ["size", "sinks", "skipped"],
            "skipped": skipped,
        }
        return sg


def _device(gm) -> torch.device:
    for t in gm.parameters():
        return t.device
    return torch.device("cpu")


def _index(sg, name: str, idx: list):
    sg.gm.register_buffer(name, torch.tensor(idx, dtype=torch.long, device=_device(sg.gm)))
    return sg.gm.graph.get_attr(name)


def _groups(hs: list, g: int):
    """(query heads, KV heads) for one attention over ``hs``: whole groups keep GQA, else one KV per query head."""
    kv = sorted({h // g for h in hs})
    if sorted(h for k in kv for h in range(k * g, (k + 1) * g)) == hs:
        return hs, kv
    return hs, [h // g for h in hs]


def _split_heads(sg, node, hs: list, size: int, sinks: int):
    info, graph = sg.info, sg.gm.graph
    if schema.get(node, "key_bias") is not None:
        raise RecipeError("window: per-head windows on a layer with a key_bias (steering) are not supported; apply window before steer")
    a = schema.bound(node)
    k_pos = a["k_pos"]
    val = getattr(k_pos, "meta", {}).get("val")
    if val is not None and val.dim() != 2:
        raise RecipeError("window: per-head windows need shared key positions; apply window before eviction passes")
    layer = schema.layer_of(node)
    g = info.num_heads // info.num_kv_heads
    rest = [h for h in range(info.num_heads) if h not in hs]
    q, k, v, q_pos, scale = a["q"], a["k"], a["v"], a["q_pos"], a["scale"]
    outs = []
    with graph.inserting_before(node):
        for tag, heads, w, s in (("win", hs, size, sinks), ("dense", rest, 0, 0)):
            qh, kvh = _groups(heads, g)
            qi = _index(sg, f"gw_window_l{layer}_{tag}_q", qh)
            ki = _index(sg, f"gw_window_l{layer}_{tag}_kv", kvh)
            sub = [graph.call_function(aten.index_select.default, (t, 1, i)) for t, i in ((q, qi), (k, ki), (v, ki))]
            kwargs = {"sinks": s} if s else {}
            sub_attn = schema.call(graph, ATTENTION, q=sub[0], k=sub[1], v=sub[2], q_pos=q_pos, k_pos=k_pos, scale=scale,
                                   window=w, **kwargs)
            sub_attn.meta.update({key: val for key, val in node.meta.items() if key in ("nn_module_stack", "stack_trace")})
            sub_attn.meta["graphwright"] = {**node.meta.get("graphwright", {}), "variant": "window" if w else "dense",
                                            "heads": heads}
            outs.append(sub_attn)
        cat = graph.call_function(aten.cat.default, (outs, 1))
        inv = [0] * info.num_heads
        for i, h in enumerate(hs + rest):
            inv[h] = i
        out = graph.call_function(aten.index_select.default, (cat, 1, _index(sg, f"gw_window_l{layer}_order", inv)))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
