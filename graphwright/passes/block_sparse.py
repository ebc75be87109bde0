"""``block_sparse``: each decode query attends only to its top-k key blocks (Quest or MoBA selection).

Based on Quest (arXiv:2406.10774) and MoBA (arXiv:2502.13189); the op's docstring
(``graphwright/ops/block_sparse.py``) defines the selection. Quest scores a page of keys with
the upper bound U = sum_d max(q_d min_d, q_d max_d); MoBA with the gate q . mean(K_block), its
own block forced and future blocks excluded. GQA: scores are averaged over a group's query
heads and blocks are chosen per KV head. Keys are never dropped from the cache; the saving is
the keys/values read and the softmax width per decode step.

Graph change. Every ``graphwright.attention`` node of a layer not in ``dense_layers`` becomes
``graphwright.block_sparse_attention(q, k, v, q_pos, k_pos, scale, block, top_k, mode, prefill,
page_a, page_b)`` (same leading arguments: one node kind for the variant; backends pick their
kernel from the arguments). The K/V cache is unchanged; each sparse layer gains page-summary
state, as in Quest: ``page_min{L}`` and ``page_max{L}`` (MoBA: ``page_mean{L}``), [B, Hk, pages,
D] fp32, updated by a ``graphwright.page_summary`` node per statistic (a decode step recomputes
only its token's page), so choosing blocks reads 2/block (MoBA 1/block) of the key bytes instead
of every key. That state costs 2 x D fp32 per page and KV head (Quest, block 64, fp32 cache:
1/64 of the K/V bytes).

Arguments: ``block`` (64), ``top_k`` (8), ``mode`` (``quest`` | ``moba``), ``dense_layers``
([0, 1]: Quest keeps the first two layers dense), ``prefill`` (False; True sparsifies prefill
too, MoBA only). Layers with a sliding window (Gemma-3's native local layers, an earlier window
pass) stay as they are: the block-sparse op has no window, and a window already bounds what a
query reads; ``sg.notes["block_sparse"]["skipped"]`` names them. If no layer is left, RecipeError.

Latent layers (``lowrank_kv`` ran first; the pass manager orders it so): selection runs on the
keys rebuilt from the latents (``passes/latent_unfold.py``: post-RoPE, key norm applied) and the
page summaries are of those keys, not of the latents. Quest's bound needs each channel's extremes
in the space where q . k is taken, and the rotation at absolute positions sits between the latent
c_k and that space, so min/max of c_k bound nothing. The cache stays latent (memory as lowrank_kv);
the keys of the step are rebuilt, as latent attention does anyway.

Exact setting: ``top_k >= number of blocks`` (ceil(length / block)). Measured on SmolLM2-135M
(README): for Quest, the paper's 16-token pages (``block=16, top_k=32``, the same 512 keys) keep
NIAH at dense level where 64-token pages lose it.
Invariants tested (``tests/passes/test_block_sparse.py``, ``tests/models/test_gemma3.py``): top_k >=
blocks gives identity logits and greedy tokens in both modes (tiny-gemma3: sliding layer skipped;
after full-rank lowrank_kv too); the op equals a naive per-query loop on random inputs; the torch
gather kernel equals the reference; U >= the true max score of every page; the page state
after prefill and decode steps equals the statistics of the whole cache, and generation with it
equals the op recomputing them; bad arguments raise RecipeError.
"""

from __future__ import annotations

import torch

from ..capture.ops import ATTENTION
from ..capture.step_graph import StateSpec
from ..errors import RecipeError
from ..ops import schema
from ..ops.block_sparse import BLOCK_SPARSE_ATTENTION, MODES
from ..ops.latent_attention import LATENT_ATTENTION
from ..ops.page_summary import PAGE_SUMMARY
from .base import MAX_TOKENS, Arg, Pass, PassContext, Tunable, register_pass
from .eviction_common import StateEditor
from .latent_unfold import unfold_keys, unfold_values
from .window import native_windows, skip_note

PAGE_STATS = {"quest": ("min", "max"), "moba": ("mean",)}


@register_pass
class BlockSparse(Pass):
    name = "block_sparse"
    needs = frozenset({"attention"})
    produces = frozenset({"block_sparse"})
    removes = frozenset({"dense_attention", "attention"})
    excludes = {"evicted": "its pages are runs of cache positions shared by the KV heads, while an eviction policy "
                           "leaves each head a different ragged set of tokens",
                "key_bias": "graphwright.block_sparse_attention has no key-bias input (steer a dense layer)"}
    stage = 50
    examples = {"exact": "block_sparse(block=4, top_k=1000, dense_layers=[])",
                "lossy": "block_sparse(block=4, top_k=2, dense_layers=[])", "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3")}
    exact = False
    doc = "Quest / MoBA block-sparse attention: decode attends only to the top-k key blocks per KV head."
    args = (
        Arg("block", int, 64, "keys per block (page)", min=1, max=MAX_TOKENS, tune=Tunable("categorical", choices=(8, 16, 32, 64))),
        Arg("top_k", int, 8, "blocks each query attends to", min=1, max=MAX_TOKENS, tune=Tunable("int", 1, 16)),
        Arg("mode", str, "quest", "block scoring: quest (min/max page bound) or moba (mean-key gate)", choices=MODES),
        Arg("dense_layers", list, [0, 1], "layers kept dense"),
        Arg("prefill", bool, False, "also sparsify prefill (mode='moba' only)"),
    )

    def layer_set(self, info) -> set | None:
        dense = {x for x in self.dense_layers if isinstance(x, int)}
        return set(range(info.num_layers)) - dense

    def applies_to(self, sg) -> str | None:
        nodes = sg.nodes(ATTENTION) + sg.nodes(LATENT_ATTENTION)
        if not nodes:
            return "the graph has no graphwright.attention or graphwright.latent_attention nodes to sparsify"
        native = {**native_windows(sg), **native_windows(sg, LATENT_ATTENTION)}
        if len(native) == len(nodes):
            return f"every layer already has a sliding window ({native}); block_sparse applies to layers without one"
        for n in nodes:
            layer = schema.layer_of(n)
            if layer in native:
                continue  # left alone (noted by run)
            if schema.get(n, "key_bias") is not None or schema.get(n, "sinks"):
                return f"layer {layer}: attention already has sinks or a key bias; block_sparse needs plain causal attention"
            val = getattr(schema.get(n, "k_pos"), "meta", {}).get("val")
            if val is not None and val.dim() != 2:
                return f"layer {layer}: key positions are per head (an eviction pass ran); apply block_sparse first"
        return None

    def run(self, sg, ctx: PassContext):
        if self.prefill and self.mode != "moba":
            raise RecipeError("block_sparse: prefill=true needs mode='moba' (Quest keeps full attention in prefill)")
        n_layers = sg.info.num_layers
        for layer in self.dense_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
                raise RecipeError(f"block_sparse: dense_layers entry {layer!r} is out of range (layers 0..{n_layers - 1})")
        dense = set(self.dense_layers)
        native = {**native_windows(sg), **native_windows(sg, LATENT_ATTENTION)}
        skipped = {layer: skip_note(w) for layer, w in sorted(native.items()) if layer not in dense}
        graph = sg.gm.graph
        ed = StateEditor(sg)
        hk, d = sg.info.num_kv_heads, sg.info.head_dim
        per_layer, done = {}, 0
        for node in sorted(sg.nodes(ATTENTION) + sg.nodes(LATENT_ATTENTION), key=schema.layer_of):
            meta = node.meta.setdefault("graphwright", {})
            layer = meta.get("layer")
            if layer in dense or layer in skipped:
                per_layer[layer] = {"mode": "dense"} if layer in dense else {"mode": "window", "skipped": skipped[layer]}
                continue
            a = schema.bound(node)
            k_pos, q_pos = a["k_pos"], a["q_pos"]
            if node.target is LATENT_ATTENTION:  # select on keys rebuilt from the latents (module docstring)
                with graph.inserting_before(node):
                    k = unfold_keys(graph, node, k_pos, d, sg.info.dtype)
                    v = unfold_values(graph, node, hk)
            else:
                k, v = a["k"], a["v"]
            pages = []
            for stat in PAGE_STATS[self.mode]:
                name = f"page_{stat}{layer}"
                prev = ed.add(StateSpec(name, "summary", (-1, hk, 0, d), torch.float32, seq_dim=2, layer=layer))
                with graph.inserting_before(node):
                    pages.append(graph.call_function(PAGE_SUMMARY, (k, k_pos, q_pos, prev, self.block, stat)))
                pages[-1].meta["graphwright"] = {"op": "page_summary", "layer": layer, "module": meta.get("module"),
                                                 "variant": f"block_sparse:{self.mode}"}
                ed.set_output(name, pages[-1])
            pages += [None] * (2 - len(pages))
            with graph.inserting_before(node):
                new = schema.call(graph, BLOCK_SPARSE_ATTENTION, q=a["q"], k=k, v=v, q_pos=q_pos, k_pos=k_pos,
                                  scale=a["scale"], block=self.block, top_k=self.top_k, mode=self.mode,
                                  prefill=self.prefill, page_a=pages[0], page_b=pages[1])
            new.meta.update({key: val for key, val in node.meta.items() if key != "graphwright"})
            # op stays "attention" (the layer's attention, for reports); the variant names the kind
            latent = "lowrank+" if node.target is LATENT_ATTENTION else ""
            new.meta["graphwright"] = {**meta, "op": "attention", "variant": f"{latent}block_sparse:{self.mode}"}
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            per_layer[layer] = {"mode": self.mode, "block": self.block, "top_k": self.top_k}
            done += 1
        if done == 0:
            why = f" and layers {sorted(skipped)} have a sliding window ({skipped})" if skipped else ""
            raise RecipeError(f"block_sparse: dense_layers={sorted(dense)}{why} leaves no layer to sparsify "
                              f"(layers 0..{n_layers - 1})")
        ed.commit()
        graph.lint()
        sg.gm.recompile()
        sg.notes["block_sparse"] = {
            "per_layer": dict(sorted(per_layer.items())),
            "counts": {"layers_sparse": done, "layers_dense": len(per_layer) - done, "layers_skipped": len(skipped)},
            "settings": {"block": self.block, "top_k": self.top_k, "mode": self.mode, "prefill": self.prefill,
                         "keys_attended_per_step": self.block * self.top_k,
                         "page_state": [f"page_{stat}" for stat in PAGE_STATS[self.mode]]},
            "show": ["mode", "top_k", "skipped"],
            "skipped": skipped,
        }
        return sg
