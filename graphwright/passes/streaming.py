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

Exact setting: sinks + window >= sequence length (input dependent; logits equal dense to ~1e-5
because of the RoPE round trip, greedy tokens identical).
Invariants tested (``tests/passes/test_streaming.py``): sinks + window >= length gives the dense
tokens (tiny Llama and Qwen2, batch 2 left-padded); the cache never exceeds sinks + window and
keeps exactly the first sinks and last window positions; generation past the model's
max_position_embeddings stays finite with cache indices < sinks + window + 1; the op equals a
slow loop oracle.
"""

from __future__ import annotations

import operator

import torch

from ..ops.eviction import EVICT_STREAMING, ROPE_CACHE_INDEX, ROPE_INVERT
from .base import Arg, Pass, PassContext, register_pass
from .eviction_common import call, evict_node, find_sites, positions_name, positions_node, rewrite_layers


def find_rotary(gm, attn=None):
    """(inv_freq get_attr node, attention_scaling) of ``attn``'s layer (``match.rotary_table``), or the
    reason there is none; without ``attn``, every attention layer is checked and the first one's returned."""
    from ..ops import schema
    from .match import NoMatch, rotary_table

    nodes = [attn] if attn is not None else schema.attention_nodes(gm)
    if not nodes:
        return "the graph has no attention nodes"
    found = [rotary_table(gm, n) for n in nodes]
    for rope in found:
        if isinstance(rope, NoMatch):
            return f"StreamingLLM re-rotates keys by cache index and needs a rotary table per layer: {rope.reason}"
    return found[0].node, found[0].scaling


@register_pass
class Streaming(Pass):
    name = "streaming"
    exact = False
    doc = "StreamingLLM: keep attention sinks + a recent window; keys cached pre-RoPE and rotated by cache index."
    args = (
        Arg("sinks", int, 4, "first tokens always kept (attention sinks)", min=0),
        Arg("window", int, 2000, "most recent tokens kept", min=1),
    )

    def applies_to(self, sg) -> str | None:
        sites = find_sites(sg)
        if isinstance(sites, str):
            return sites
        if any(site.latent for site in sites):
            return ("streaming does not apply to latent attention (lowrank_kv): its keys are rebuilt and rotated at "
                    "absolute positions inside graphwright.latent_attention; use fastgen, h2o or snapkv with lowrank_kv")
        rot = find_rotary(sg.gm)
        return rot if isinstance(rot, str) else None

    def run(self, sg, ctx: PassContext):
        inv, scaling = find_rotary(sg.gm)
        pos = positions_node(sg)
        graph = sg.gm.graph

        def build(sg, ed, site, kp_all):
            inv, scaling = find_rotary(sg.gm, site.attn)  # this layer's table (Gemma-3: local or global)
            a = site.args
            k_new = a["k"].args[0][1]
            with graph.inserting_before(site.attn):
                q_pre = call(graph, ROPE_INVERT, a["q"], pos, inv, scaling)
                k_pre = call(graph, torch.ops.aten.cat.default, [site.k_cache, call(graph, ROPE_INVERT, k_new, pos, inv, scaling)], 2)
                qk = call(graph, ROPE_CACHE_INDEX, q_pre, k_pre, kp_all, inv, scaling)
                q_rot, k_rot = call(graph, operator.getitem, qk, 0), call(graph, operator.getitem, qk, 1)
            site.attn.update_arg(0, q_rot)
            site.attn.update_arg(1, k_rot)
            outs = evict_node(sg, ed, site, EVICT_STREAMING, (k_pre, a["v"], a["q_pos"], kp_all, self.sinks, self.window),
                              3, "streaming")
            return dict(zip((site.k_name, site.v_name, positions_name(site.layer)), outs))

        layers = rewrite_layers(sg, "streaming", build)
        sg.notes["streaming"] = {
            "per_layer": {layer: {"sinks": self.sinks, "window": self.window} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, "rope_scaling": scaling, "keys_cached": "pre-RoPE"},
        }
        return sg
