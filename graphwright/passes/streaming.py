"""``streaming``: StreamingLLM, attention sinks plus a rolling window.

Technique (arXiv 2309.17453, "Efficient Streaming Language Models with Attention Sinks"; reference
code ``streaming_llm/kv_cache.py::StartRecentKVCache`` and ``pos_shift/modify_llama.py``). The
cache keeps the first ``sinks`` tokens (the attention sinks) and the last ``window`` tokens. Keys
are cached *before* RoPE and rotated by their index in the cache, and the query by its own cache
index, so the positions attention sees never exceed sinks + window and generation runs past the
trained context. Defaults sinks = 4, window = 2000 (the paper's example script).

Setting here: the cache stores pre-RoPE keys, recovered by inverting the model's rotation with
the same fp32 angles (``graphwright.rope_invert``: exact up to ~1e-7 relative in fp32; see
``ops/rope_index_ref.py`` for why this beats re-deriving k from k_proj); ``graphwright.rope_cache_index``
rotates q and k by cache index before the unchanged attention op; ``graphwright.evict_streaming``
keeps sinks + window after every step (prefill included). Visibility still uses absolute
positions (same order as cache indices). Same set for every head; positions state stays per
head for a uniform layout. Needs one rotary table (Llama, Mistral, Qwen2, Phi-3, SmolLM2).
``layers=[...]`` evicts only those layers (the others keep absolute-position RoPE).

Per-layer windows: ``window=[w_0, ..., w_{n-1}]`` gives each evicted layer (``layers=`` or every
layer, in layer order) its own window (``graphwright tune --scope layer``: one window per layer, like
``lowrank_kv(keep=[...])``); sinks stay one value. Each layer's op is the same ``evict_streaming``
with its own window, so a layer keeps exactly what ``streaming(window=w_l)`` keeps on it; the torch
backend's ``streaming_shift`` reads sinks/window from each layer's own op and its per-step memos are
keyed by (sinks, window), so layers with different windows never share a slot plan. Two streaming
passes on disjoint ``layers=`` also compose (each checks only its own layers' rotary tables; the notes
merge), e.g. ``streaming(window=8, layers=[0]) + streaming(window=16, layers=[1])``, the same graph as
``streaming(window=[8, 16])``.

Latent layers (``lowrank_kv`` first): the cache holds latents, so there is nothing to invert on
the key side. The layer's ``graphwright.latent_attention`` becomes a plain ``graphwright.attention``
over keys rebuilt *before* RoPE (``graphwright.latent_keys`` with ``inv_freq=None``), the query
un-rotated with ``rope_invert`` and both rotated by cache index with ``rope_cache_index`` (the
layer's own ``inv_freq``/``rope_scaling``); values are the latent ``c_v`` expanded to the KV heads
(absorbed mode: output [B, H, T, r_v] feeding the folded o_proj, as the torch latent kernel does)
or rebuilt ``c_v @ v_up + v_bias`` (reconstruct mode). ``evict_streaming`` compacts the shared
latent payload cat([c_k, c_v]) like the other policies (every head keeps the same set anyway).

Exact setting: sinks + window >= sequence length (every layer's window, for a list; input dependent;
logits equal dense to ~1e-5 because of the RoPE round trip, greedy tokens identical).
Invariants tested (``tests/passes/test_streaming.py``, ``test_eviction_latent.py``): sinks + window
>= length gives the dense tokens (tiny Llama and Qwen2, batch 2 left-padded; also after
``lowrank_kv(keep=1.0)``, where the latent cache never exceeds sinks + window rows); the cache never exceeds sinks + window and
keeps exactly the first sinks and last window positions; generation past the model's
max_position_embeddings stays finite with cache indices < sinks + window + 1; the op equals a
slow loop oracle; per-layer windows keep on each layer exactly what the single-window pass keeps there,
with the split form (two passes) giving the same logits (``tests/passes/test_streaming_per_layer.py``).
"""

from __future__ import annotations

import operator

import torch

from ..capture.ops import ATTENTION
from ..errors import RecipeError
from ..ops import schema
from ..ops.eviction import ROPE_CACHE_INDEX, ROPE_INVERT
from ..ops.policy_streaming import STREAMING_POLICY
from .base import MAX_TOKENS, Arg, PassContext, Tunable, register_pass
from .latent_unfold import unfold_keys, unfold_values
from .eviction_common import (LAYERS_ARG, EvictionPass, call, find_sites, insert_policy, positions_node,
                              rewrite_layers)

aten = torch.ops.aten


def find_rotary(gm, attn=None):
    """(inv_freq get_attr node, attention_scaling) of ``attn``'s layer (``match.rotary_table``), or the
    reason there is none; ``attn`` a list: each of those nodes is checked and the first one's returned;
    without ``attn``, every attention layer is checked."""
    from ..ops import schema
    from .match import NoMatch, rotary_table

    if attn is None:
        nodes = schema.attention_nodes(gm)
    else:
        nodes = list(attn) if isinstance(attn, (list, tuple)) else [attn]
    if not nodes:
        return "the graph has no attention nodes"
    found = [rotary_table(gm, n) for n in nodes]
    for rope in found:
        if isinstance(rope, NoMatch):
            return f"StreamingLLM re-rotates keys by cache index and needs a rotary table per layer: {rope.reason}"
    return found[0].node, found[0].scaling


@register_pass
class Streaming(EvictionPass):
    name = "streaming"
    needs = EvictionPass.needs | {"rotary"}  # keys are re-rotated by cache index
    examples = {"exact": "streaming(sinks=4, window=1000)", "lossy": "streaming(sinks=2, window=6)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"), "first_token_dense": True}
    exact = False
    doc = "StreamingLLM: keep attention sinks + a recent window; keys cached pre-RoPE and rotated by cache index."
    args = (
        Arg("sinks", int, 4, "first tokens always kept (attention sinks)", min=0, max=MAX_TOKENS),
        Arg("window", (int, list), 2000, "most recent tokens kept; a list: one window per evicted layer (layers= or "
            "every layer), in layer order", min=1, max=MAX_TOKENS,
            tune=Tunable("int", 0.05, 1.0, per_context=True, scope="layer", layer_form="list")),
        LAYERS_ARG,
    )

    def __init__(self, **values):
        super().__init__(**values)
        w = self.values["window"]
        if isinstance(w, list):
            ok = w and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_TOKENS for x in w)
            if not ok:
                raise RecipeError(f"streaming: a per-layer window must be a non-empty list of ints in [1, {MAX_TOKENS}], one per "
                                  f"evicted layer (layers= or every layer, in layer order); got {w!r}")

    def windows(self, layers) -> dict:
        """``{layer: window}`` for the evicted layers (sorted); ``RecipeError`` when a window list does not match them."""
        layers = sorted(layers)
        w = self.values["window"]
        if not isinstance(w, list):
            return {layer: w for layer in layers}
        if len(w) != len(layers):
            raise RecipeError(f"streaming: window lists {len(w)} per-layer windows but the pass evicts {len(layers)} layer(s) "
                              f"{layers} (one window per evicted layer, in layer order; layers= picks them)")
        return dict(zip(layers, w))

    def applies_to(self, sg) -> str | None:
        chosen = self.layer_set(sg.info)
        try:
            self.windows(chosen)
        except RecipeError as err:
            return str(err)
        sites = find_sites(sg, chosen)
        if isinstance(sites, str):
            return sites
        for site in sites:
            if site.latent and site.arg("inv_freq") is None:
                return f"layer {site.layer}: latent attention without a rotary table; StreamingLLM re-rotates keys"
        dense = [site.attn for site in sites if not site.latent]
        if not dense:
            return None
        rot = find_rotary(sg.gm, dense)  # its own layers only: another streaming pass may own the others
        return rot if isinstance(rot, str) else None

    def run(self, sg, ctx: PassContext):
        chosen = self.layer_set(sg.info)
        windows = self.windows(chosen)
        sites = find_sites(sg, chosen)
        dense = [s.attn for s in sites if not s.latent]
        rot = find_rotary(sg.gm, dense) if dense else None  # checks each of its dense layers has a table
        latent = []

        def build(sg, ed, site, kp_all):
            if site.latent:
                k_pre = rotate_latent_layer(sg, site, kp_all)
                latent.append(site.layer)
            else:
                k_pre = rotate_dense_layer(sg, site, kp_all, *find_rotary(sg.gm, site.attn))  # this layer's table
            params = {"sinks": self.sinks, "window": windows[site.layer]}
            return insert_policy(sg, ed, site, STREAMING_POLICY, params, k=k_pre)

        layers = rewrite_layers(sg, "streaming", build, chosen)
        before = sg.notes.get("streaming")  # another streaming pass on other layers: merge (a new dict; copies share values)
        per_layer = {**(before or {}).get("per_layer", {}),
                     **{layer: {"sinks": self.sinks, "window": windows[layer]} for layer in layers}}
        counts = {"layers_evicted": len(per_layer), "latent_layers": len(latent) + (before or {}).get("counts", {}).get("latent_layers", 0)}
        settings = {**self.values, "rope_scaling": rot[1] if rot else None, "keys_cached": "pre-RoPE"}
        if before is not None:  # as one pass over both layer sets: layers= all of them, one window per layer
            order = sorted(per_layer)
            settings.update(layers=order, window=[per_layer[layer]["window"] for layer in order])
        sg.notes["streaming"] = {"per_layer": dict(sorted(per_layer.items())), "counts": counts, "settings": settings}
        return sg


def rotate_dense_layer(sg, site, kp_all, inv, scaling):
    """Attention over q and the pre-RoPE cache rotated by cache index; returns the pre-RoPE keys to cache."""
    graph, pos = sg.gm.graph, positions_node(sg)
    k_new = site.k_new  # k_all = cat([k_cache, k_new], 2) (matched by match.layer_site)
    with graph.inserting_before(site.attn):
        q_pre = call(graph, ROPE_INVERT, site.arg("q"), pos, inv, scaling)
        k_pre = call(graph, aten.cat.default, [site.k_cache, call(graph, ROPE_INVERT, k_new, pos, inv, scaling)], 2)
        qk = call(graph, ROPE_CACHE_INDEX, q_pre, k_pre, kp_all, inv, scaling)
        q_rot, k_rot = call(graph, operator.getitem, qk, 0), call(graph, operator.getitem, qk, 1)
    schema.set(site.attn, "q", q_rot)
    schema.set(site.attn, "k", k_rot)
    return k_pre


def rotate_latent_layer(sg, site, kp_all):
    """Replace the layer's latent attention by ``graphwright.attention`` over pre-RoPE keys rebuilt from c_k,
    rotated by cache index, and the latent (absorbed) or rebuilt (reconstruct) values.

    Returns the pre-RoPE keys (the eviction op's ``k``; the latent payload is what it compacts)."""
    graph, info, old = sg.gm.graph, sg.info, site.attn
    inv, scaling = site.arg("inv_freq"), site.arg("rope_scaling")
    k_pos = site.arg("k_pos")  # [B, S]: head 0 of the per-head positions (rewrite_layers set it)
    hk = info.num_kv_heads
    with graph.inserting_before(old):
        q_pre = call(graph, ROPE_INVERT, site.arg("q"), positions_node(sg), inv, scaling)
        k_pre = unfold_keys(graph, old, k_pos, info.head_dim, info.dtype, inv_freq=None)  # not rotated
        qk = call(graph, ROPE_CACHE_INDEX, q_pre, k_pre, kp_all, inv, scaling)
        q_rot, k_rot = call(graph, operator.getitem, qk, 0), call(graph, operator.getitem, qk, 1)
        v = unfold_values(graph, old, hk)
        extra = {name: site.arg(name) for name in ("window", "sinks")
                 if schema.has_arg(old.target, name) and site.arg(name)}
        new = schema.call(graph, ATTENTION, q=q_rot, k=k_rot, v=v, q_pos=site.arg("q_pos"), k_pos=k_pos,
                          scale=site.arg("scale"), **extra)
    new.meta.update({key: val for key, val in old.meta.items() if key != "graphwright"})
    new.meta["graphwright"] = dict(old.meta.get("graphwright", {}))
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    site.attn = new
    return k_pre
