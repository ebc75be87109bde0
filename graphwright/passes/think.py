"""``think``: ThinK query-driven key-channel pruning (arXiv 2407.21018).

Technique (official code ``SalesforceAIResearch/ThinK``, ``key_pruner_query_driven``; the op semantics
are in ``ops/think_ref.py``): once, at the end of prefill, each KV head scores its key channels with the
observation window (the last ``window`` prompt queries): ``mean_t q_t[c]^2 * mean_s k_s[c]^2``, which ranks
channels like the paper's ``||Q_w[:, c] K[:, c]^T||_F``. The top ``keep`` fraction of channels
(``keep`` = 1 - lambda; ``D - floor((1 - keep) D)`` channels) is kept per KV head: the keys of every
prompt token but the last ``recent`` are stored with only those channels (a narrower tensor plus the
channel index per head); the last ``recent`` prompt tokens and every decode token stay full width.
Decode logits are ``[q[kept] . K_pruned^T ; q . K_recent^T] / sqrt(D)`` (the original D), one softmax.
Values are never pruned.

GQA: the query energy of the g query heads reading one KV head is pooled (``pool="mean"``, as kvpress
``ThinKPress``; or ``"max"``), so each KV head stores one channel set and the saving is real under GQA
(the official eager code repeats keys to every query head first and saves nothing there).

State per layer: ``think_keys<l>`` [B, Hk, S_old, keep] (kind ``kv``), ``think_channels<l>`` [B, Hk, 1, keep]
int64 (kind ``positions``, counted as index bytes), and the layer's own key cache holds the full-width part.
The attention op is unchanged: it reads ``cat([think_expand(think_keys, channels), k_full])``, the narrow
keys scattered back to D channels with zeros, whose dot products with q equal ``q[kept] . k_pruned``.
So ``kv_bytes`` counts ``S_old * keep + S_full * D`` key elements per head (plus full values).

Composition: token eviction runs first (``snapkv + think``: the pass manager orders any eviction
pass before ``think``); channels are then scored and pruned on the kept keys, as ThinK's ``update_thinkv``
does after SnapKV. Policies that evict during decode (``h2o``, ``fastgen``, ``streaming``) are refused: their
decode-time compaction mixes narrow and full-width slots. ``lowrank_kv`` is refused by the manager:
its cache holds one latent per token shared by the KV heads, not per-head key channels.

Exact setting: ``keep=1.0`` (every channel kept; logits equal the dense model's).
Invariants tested (``tests/passes/test_think.py``, ``tests/ops/test_think_ops.py``): keep=1.0 gives the
dense logits and tokens (tiny Llama and Qwen2, batch 2 left-padded, with and without snapkv); the kept
channels equal a loop oracle; decode logits equal ``(q * m) . k^T`` on old tokens and ``q . k^T`` on recent
ones; channels whose query energy is exactly 0 are pruned without changing logits; ``kv_bytes`` equals
the narrow + full-width element count; h2o + think and lowrank_kv + think are refused with the reason.
"""

from __future__ import annotations

import math

import torch

from ..capture.ops import ATTENTION
from ..capture.step_graph import StateSpec
from ..errors import RecipeError
from ..ops import schema
from ..ops.eviction import EVICT_OPS, EVICT_SNAPKV
from ..ops.think import THINK_EXPAND, THINK_PRUNE
from ..ops.think_ref import POOLS
from .base import MAX_TOKENS, Arg, Pass, PassContext, Tunable, register_pass
from .eviction_common import LAYERS_ARG, StateEditor, call, insert_outputs, positions_name, select_layers
from .match import layer_site

PREFILL_ONLY_EVICTION = {EVICT_SNAPKV: "snapkv"}  # eviction ops that change nothing after prefill


def kept_channels(keep: float, head_dim: int) -> int:
    """``head_dim - floor((1 - keep) * head_dim)`` (1e-9 guards 0.3 * 10 = 2.9999...)."""
    return head_dim - int(math.floor((1.0 - keep) * head_dim + 1e-9))


@register_pass
class Think(Pass):
    name = "think"
    examples = {"exact": "think(keep=1.0)", "lossy": "think(keep=0.5, recent=3, window=4)",
                "models": ("tiny-llama", "tiny-qwen2"), "first_token_dense": True}
    exact = False
    doc = "ThinK: after prefill store old keys with only the top `keep` fraction of channels per KV head (query-driven)."
    args = (
        Arg("keep", float, 0.6, "fraction of key channels kept per KV head (1 - lambda; ThinK's default lambda = 0.4; "
            "1.0 = identity)", min=1e-6, max=1.0, tune=Tunable("float", 0.1, 1.0)),
        Arg("recent", int, 32, "last prompt tokens kept full width (decode tokens always are)", min=0, max=MAX_TOKENS),
        Arg("window", int, 32, "observation window: the last prompt queries that score the channels", min=1, max=MAX_TOKENS),
        Arg("pool", str, "mean", "GQA: pooling of the query energy over a KV head's query heads", choices=POOLS),
        LAYERS_ARG,
    )
    needs = frozenset({"dense_attention"})
    produces = frozenset({"channel_pruned"})
    forbids = frozenset({"key_bias"})  # steering's bias is added to the rewritten attention afterwards
    excludes = {"latent_cache": "lowrank_kv caches one latent per token shared by the KV heads, not per-head key "
                                "channels, so there are no key channels to prune",
                "block_sparse": "block_sparse's page summaries are of full-width keys at fixed cache positions",
                "head_split": "it rewrites one attention node per layer, and a per-head window split the layer"}
    stage = 70

    def is_identity(self) -> bool:
        return self.keep >= 1.0

    def layer_set(self, info) -> set[int] | None:
        layers = self.values.get("layers")
        return None if layers is None else set(select_layers(self.name, layers, info.num_layers))

    def _sites(self, sg):
        """[(site, eviction node or None)] of the chosen layers, or the first reason one cannot be rewritten."""
        wanted = self.layer_set(sg.info)
        nodes = [n for n in sg.nodes(ATTENTION)
                 if wanted is None or schema.layer_of(n) in wanted]
        if not nodes:
            return "the graph has no graphwright.attention nodes whose keys can be pruned"
        out = []
        for n in nodes:
            where = f"layer {schema.layer_of(n)}"
            site = layer_site(sg, n)
            if not site:  # e.g. streaming: attention reads pre-RoPE keys re-rotated by cache index
                return f"{site.reason}; think needs post-RoPE keys that attention reads straight from the cache"
            users = [u for u in site.k_cat.users if u is not n]
            evict = [u for u in users if u.op == "call_function" and u.target in EVICT_OPS]
            if evict and evict[0].target not in PREFILL_ONLY_EVICTION:
                name = str(evict[0].target).split("evict_")[-1].split(".")[0]
                return (f"{where}: {name} evicts during decode, which would mix narrow and full-width key slots; "
                        f"think composes with prefill-only eviction ({', '.join(PREFILL_ONLY_EVICTION.values())})")
            if any(u.op != "output" and u not in evict for u in users):
                return f"{where}: the key cache is read by something besides attention and eviction ({users})"
            out.append((site, evict[0] if evict else None))
        return out

    def applies_to(self, sg) -> str | None:
        sites = self._sites(sg)
        return sites if isinstance(sites, str) else None

    def run(self, sg, ctx: PassContext):
        sites = self._sites(sg)
        if isinstance(sites, str):
            raise RecipeError(f"think: {sites}")
        D, hk = sg.info.head_dim, sg.info.num_kv_heads
        keep = kept_channels(self.keep, D)  # >= 1 for any keep > 0
        ed = StateEditor(sg)
        for site, evict in sites:
            self._rewrite(sg, ed, site, evict, keep, D, hk)
        ed.commit()
        graph = sg.gm.graph
        graph.eliminate_dead_code()
        graph.lint()
        sg.gm.recompile()
        layers = [s.layer for s, _ in sites]
        sg.notes["think"] = {
            "per_layer": {s.layer: {"channels": keep, "after": "snapkv" if e is not None else None} for s, e in sites},
            "counts": {"layers_pruned": len(layers)},
            "settings": {**self.values, "head_dim": D, "kept_channels": keep},
            "show": ["channels"],
        }
        return sg

    def _rewrite(self, sg, ed, site, evict, keep: int, D: int, hk: int):
        graph, layer, dtype = sg.gm.graph, site.layer, next(s.dtype for s in sg.state if s.name == site.k_name)
        narrow = ed.add(StateSpec(f"think_keys{layer}", "kv", (-1, hk, 0, keep), dtype, seq_dim=2, layer=layer))
        chans = ed.add(StateSpec(f"think_channels{layer}", "positions", (-1, hk, 0, keep), torch.long, seq_dim=2, layer=layer))
        with graph.inserting_before(site.attn):
            old = schema.call(graph, THINK_EXPAND, k_pruned=narrow, channels=chans, head_dim=D)
            k_attn = call(graph, torch.ops.aten.cat.default, [old, site.k_cat], 2)
        schema.set(site.attn, "k", k_attn)
        k_out, v_out = ed.find(site.k_name)[2], ed.find(site.v_name)[2]
        if evict is not None:
            schema.set(evict, "k", k_attn)
            pos_out = ed.find(positions_name(layer))[2]
            rank = {n: i for i, n in enumerate(graph.nodes)}
            anchor = max((k_out, v_out, pos_out), key=rank.__getitem__)
        else:  # shared [B, S] positions: a per-head copy (right-aligning a left-padded prefill changes nothing)
            k_out, anchor = k_attn, site.attn
            with graph.inserting_before(site.attn):
                pos_out = call(graph, torch.ops.aten.expand.default,
                               call(graph, torch.ops.aten.unsqueeze.default, schema.get(site.attn, "k_pos"), 1), [-1, hk, -1])
        with graph.inserting_after(anchor):
            node = schema.call(graph, THINK_PRUNE, q=site.arg("q"), k=k_out, k_pruned=narrow, channels=chans, k_full=site.k_cat,
                               v=v_out, q_pos=site.arg("q_pos"), k_pos=pos_out, keep=keep, recent=self.recent,
                               window=self.window, pool=self.pool)
        node.meta["graphwright"] = {"op": "kv_think", "layer": layer, "variant": "think",
                                    "module": site.attn.meta.get("graphwright", {}).get("module")}
        outs = insert_outputs(graph, node, 5)
        ed.set_output(f"think_keys{layer}", outs[0])
        ed.set_output(f"think_channels{layer}", outs[1])
        ed.set_output(site.k_name, outs[2])
        ed.set_output(site.v_name, outs[3])  # right-aligned with the keys (unchanged without eviction)
        if evict is not None:
            ed.set_output(positions_name(layer), outs[4])
        meta = site.attn.meta.setdefault("graphwright", {})
        meta["variant"] = f"{meta['variant']}+think" if meta.get("variant") else "think"
