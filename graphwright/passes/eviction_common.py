"""The graph rewrite shared by KV-eviction passes (H2O, SnapKV, FastGen, StreamingLLM).

Captured layout, per layer l::

    k_all = cat([k_cache_l, k_new], 2)          # [B, Hk, S + T, D], same for v
    out   = graphwright.attention(q, k_all, v_all, positions, key_pos_all, scale, window)
    state outputs: key_pos_all = cat([key_positions, positions], 1) (shared [B, S]), k_all, v_all

After the rewrite, per evicted layer::

    key_pos_all_l = cat([key_positions_l, positions[:, None].expand(-1, Hk, -1)], 2)   # [B, Hk, S_l + T]
    out = graphwright.attention(q, k_all, v_all, positions, key_pos_all_l, ...)      # op accepts per-head k_pos
    k', v', key_positions_l', *aux' = graphwright.evict_<policy>(q, k_all, v_all, positions, key_pos_all_l, *aux, ...)

so each layer owns per-head positions state [B, Hk, S_l] (padded with -1 where a head keeps fewer
tokens) plus whatever the policy needs (cumulative scores, token classes, policy ids), declared as
``StateSpec``s the runtime allocates and threads. The shared [B, S] key positions are dropped
once no layer reads them. Everything stays a pure step function.

Latent layers (``lowrank_kv`` ran first: ``graphwright.latent_attention`` over c_k [B, S, r_k],
c_v [B, S, r_v]) are evicted too. A latent row is shared by every KV head, so a layer keeps the
*union* of its heads' keep sets: the policy op scores with keys rebuilt from the latents
(``graphwright.latent_keys``) and compacts one shared payload cat([c_k, c_v], -1)[:, None]
([B, 1, S, r_k + r_v]); a payload with one head makes ``compact`` merge the heads' sets. Each head
still selects by its own policy and budget; the layer holds at most H_kv times a head's budget
(and nothing is dropped while one head is ``full``). Per-head positions stay [B, Hk, S_l], equal
across heads, so the runtime's kept-token counts describe what the latent cache really holds.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch

from ..capture.ops import ATTENTION
from ..capture.step_graph import StateSpec
from ..ops.eviction import LATENT_KEYS
from ..ops.latent_attention import LATENT_ATTENTION

ATTN_ARGS = ("q", "k", "v", "q_pos", "k_pos", "scale", "window", "key_bias")
LATENT_ARGS = ("q", "c_k", "c_v", "k_up", "k_bias", "v_up", "v_bias", "q_pos", "k_pos", "inv_freq", "rope_scaling",
               "scale", "window")
SHARED_POSITIONS = "key_positions"


def positions_name(layer: int) -> str:
    """Name of a layer's per-head positions state (the runtime counts kept tokens from these)."""
    return f"{SHARED_POSITIONS}{layer}"


@dataclass
class LayerSite:
    """One layer's attention node and the cache nodes around it."""

    layer: int
    attn: torch.fx.Node
    args: dict  # attention arguments by name
    k_cache: torch.fx.Node  # state placeholders
    v_cache: torch.fx.Node
    k_name: str  # their state names
    v_name: str
    latent: bool = False  # graphwright.latent_attention over a latent cache shared by the KV heads
    latent_k_width: int = 0  # r_k: where c_k ends in the shared payload

    def arg(self, name):
        return self.args.get(name)

    @property
    def arg_names(self):
        return LATENT_ARGS if self.latent else ATTN_ARGS


class StateEditor:
    """Edits the state layout: placeholders after the 3 fixed inputs, outputs after the logits, and ``sg.state``.

    Entries stay aligned (spec, placeholder, output value); ``commit`` writes outputs and specs back.
    """

    def __init__(self, sg):
        self.sg = sg
        self.graph = sg.gm.graph
        phs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.fixed = phs[:3]
        n = len(sg.state)
        self.out_node = next(n_ for n_ in self.graph.nodes if n_.op == "output")
        outs = list(self.out_node.args[0])
        self.head, self.tail = outs[:1], outs[1 + n:]
        self.entries = [[spec, ph, o] for spec, ph, o in zip(sg.state, phs[3:3 + n], outs[1:1 + n])]

    def find(self, name):
        return next((e for e in self.entries if e[0].name == name), None)

    def by_placeholder(self, node):
        return next((e for e in self.entries if e[1] is node), None)

    def add(self, spec: StateSpec) -> torch.fx.Node:
        last = self.entries[-1][1] if self.entries else self.fixed[-1]
        with self.graph.inserting_after(last):
            ph = self.graph.placeholder(spec.name)
        self.entries.append([spec, ph, None])
        return ph

    def set_output(self, name: str, node):
        self.find(name)[2] = node

    def drop_unused_shared_positions(self):
        """Remove the shared [B, S] key positions once only the output still reads them."""
        e = self.find(SHARED_POSITIONS)
        if e is None or not isinstance(e[2], torch.fx.Node):
            return
        cat = e[2]
        if set(cat.users) - {self.out_node}:
            return
        if set(e[1].users) - {cat}:
            return
        self.entries.remove(e)
        self._write_outputs()
        self.graph.erase_node(cat)
        self.graph.erase_node(e[1])

    def _write_outputs(self):
        self.out_node.args = (tuple(self.head + [e[2] for e in self.entries] + self.tail),)

    def commit(self):
        missing = [e[0].name for e in self.entries if e[2] is None]
        if missing:
            raise RuntimeError(f"state {missing} has no output")
        self._write_outputs()
        self.sg.state = [e[0] for e in self.entries]


def attention_args(node) -> dict:
    names = LATENT_ARGS if node.target is LATENT_ATTENTION else ATTN_ARGS
    d = {name: a for name, a in zip(names, node.args)}
    d.update(node.kwargs)
    return d


def locate_layer(ed: StateEditor, node) -> LayerSite | str:
    """The layer's cache placeholders, or the reason the layout is not the captured dense one."""
    layer = node.meta.get("graphwright", {}).get("layer")
    latent = node.target is LATENT_ATTENTION
    args = attention_args(node)
    where = f"layer {layer}"
    if args.get("key_bias") is not None:
        return f"{where}: attention has a key_bias (steering); apply eviction before steer"
    caches = []
    for name in ("c_k", "c_v") if latent else ("k", "v"):
        cat = args[name]
        dims = (1, -2) if latent else (2, -2)
        if not (isinstance(cat, torch.fx.Node) and cat.target is torch.ops.aten.cat.default
                and len(cat.args[0]) == 2 and cat.args[1] in dims):
            return f"{where}: attention {name} is not cat([cache, new], {dims[0]}) (already rewritten?)"
        e = ed.by_placeholder(cat.args[0][0])
        if e is None or e[0].kind != "kv":
            return f"{where}: attention {name} does not read a kv state input"
        caches.append(e)
    kp = args["k_pos"]
    shared = ed.find(SHARED_POSITIONS)
    if shared is None or not (isinstance(kp, torch.fx.Node) and kp.target is torch.ops.aten.cat.default
                              and kp.args[0][0] is shared[1]):
        return f"{where}: key positions are already per layer (an eviction pass applies once)"
    return LayerSite(layer, node, args, caches[0][1], caches[1][1], caches[0][0].name, caches[1][0].name,
                     latent, caches[0][0].shape[-1] if latent else 0)


def find_sites(sg) -> list[LayerSite] | str:
    """Every attention layer's site (sorted by layer), or the first reason one cannot be rewritten."""
    nodes = sg.nodes(ATTENTION) + sg.nodes(LATENT_ATTENTION)
    if not nodes:
        return "the graph has no graphwright.attention or graphwright.latent_attention nodes to evict from"
    ed = StateEditor(sg)
    sites = []
    for n in nodes:
        site = locate_layer(ed, n)
        if isinstance(site, str):
            return site
        sites.append(site)
    return sorted(sites, key=lambda s: s.layer)


def positions_node(sg):
    return [n for n in sg.gm.graph.nodes if n.op == "placeholder"][1]


def call(graph, target, *args, **kwargs):
    return graph.call_function(target, args, kwargs)


def insert_outputs(graph, node, n: int) -> list:
    """getitem nodes 0..n-1 of a multi-output node, placed right after it."""
    outs, last = [], node
    for i in range(n):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (node, i))
        outs.append(last)
    return outs


def tag(node, site: LayerSite, op: str, variant: str):
    node.meta["graphwright"] = {"op": op, "layer": site.layer, "module": site.attn.meta.get("graphwright", {}).get("module"),
                                "variant": variant}
    if "nn_module_stack" in site.attn.meta:
        node.meta["nn_module_stack"] = site.attn.meta["nn_module_stack"]


BuildFn = Callable  # (sg, ed, site, key_pos_all) -> {state name: output node}


def rewrite_layers(sg, variant: str, build: BuildFn, layers=None) -> list[int]:
    """Give each selected layer per-head positions state and the policy's eviction node.

    ``build(sg, ed, site, key_pos_all)`` inserts the eviction node after ``site.attn`` (adding any
    extra state with ``ed.add``) and returns the new output node of every state it owns
    (k, v, per-head positions, extras). Returns the rewritten layer indices.
    """
    sites = find_sites(sg)
    if isinstance(sites, str):
        raise ValueError(sites)
    ed = StateEditor(sg)
    graph = sg.gm.graph
    hk = sg.info.num_kv_heads
    pos = positions_node(sg)
    done = []
    for site in sites:
        if layers is not None and site.layer not in layers:
            continue
        kp_in = ed.add(StateSpec(positions_name(site.layer), "positions", (-1, hk, 0), torch.long, seq_dim=2, layer=site.layer))
        with graph.inserting_before(site.attn):
            # this step's positions, one copy per KV head: [B, T] -> [B, Hk, T]
            per_head = call(graph, torch.ops.aten.expand.default, call(graph, torch.ops.aten.unsqueeze.default, pos, 1), [-1, hk, -1])
            kp_all = call(graph, torch.ops.aten.cat.default, [kp_in, per_head], 2)
        attn_kp = kp_all
        if site.latent:
            with graph.inserting_before(site.attn):
                # every head holds the same (union) set: head 0's positions are the latent rows' positions
                attn_kp = call(graph, torch.ops.aten.select.int, kp_all, 1, 0)  # [B, S_l + T]
                site.args["k"] = call(graph, LATENT_KEYS, site.args["c_k"], site.args["k_up"], site.args["k_bias"],
                                      attn_kp, site.args["inv_freq"], site.args["rope_scaling"], sg.info.head_dim,
                                      k_norm=site.args.get("k_norm"), k_norm_eps=site.args.get("k_norm_eps", 1e-6))
                payload = call(graph, torch.ops.aten.cat.default, [site.args["c_k"], site.args["c_v"]], -1)
                site.args["v"] = call(graph, torch.ops.aten.unsqueeze.default, payload, 1)  # [B, 1, S, r_k + r_v]
        i = site.arg_names.index("k_pos")
        if i < len(site.attn.args):
            site.attn.update_arg(i, attn_kp)
        else:
            site.attn.update_kwarg("k_pos", attn_kp)
        site.args["k_pos"] = kp_all
        for name, node in build(sg, ed, site, kp_all).items():
            ed.set_output(name, node)
        meta = site.attn.meta.setdefault("graphwright", {})
        meta["variant"] = f"{meta['variant']}+{variant}" if site.latent and meta.get("variant") else variant
        done.append(site.layer)
    ed.drop_unused_shared_positions()
    ed.commit()
    graph.eliminate_dead_code()
    graph.lint()
    sg.gm.recompile()
    return done


def cache_outputs(sg, site: LayerSite, k_out, v_out) -> dict:
    """{k state: node, v state: node} from an eviction op's k, v outputs (latent: split the shared payload)."""
    if not site.latent:
        return {site.k_name: k_out, site.v_name: v_out}
    graph, r = sg.gm.graph, site.latent_k_width
    with graph.inserting_after(v_out):
        rows = call(graph, torch.ops.aten.select.int, v_out, 1, 0)  # [B, S', r_k + r_v]
    with graph.inserting_after(rows):
        c_k = call(graph, torch.ops.aten.slice.Tensor, rows, -1, 0, r)
    with graph.inserting_after(c_k):
        c_v = call(graph, torch.ops.aten.slice.Tensor, rows, -1, r, 2 ** 62)
    return {site.k_name: c_k, site.v_name: c_v}


def evict_node(sg, ed, site: LayerSite, op, args: tuple, n_out: int, variant: str) -> list:
    """Insert ``op(*args)`` right after the layer's attention node; returns its n_out outputs."""
    graph = sg.gm.graph
    with graph.inserting_after(site.attn):
        node = graph.call_function(op, args)
    tag(node, site, "kv_evict", variant)
    return insert_outputs(graph, node, n_out)


def aux_state(ed, site, name: str, dtype, hk: int) -> torch.fx.Node:
    """A per-slot bookkeeping state [B, Hk, S_l] (kind "positions": counted as index bytes, not KV)."""
    return ed.add(StateSpec(f"{name}{site.layer}", "positions", (-1, hk, 0), dtype, seq_dim=2, layer=site.layer))


def latent_settings(sg) -> dict:
    """Notes settings describing latent layers (empty when there are none)."""
    layers = sorted(n.meta.get("graphwright", {}).get("layer") for n in sg.nodes(LATENT_ATTENTION))
    if not layers:
        return {}
    return {"latent_layers": len(layers), "latent_rule": "union of the KV heads' keep sets (one latent row per token)"}


def frac_or_count(x) -> tuple[int, float]:
    """Recipe value -> (count, fraction): an int >= 1 is a token count, a float is a fraction of the length."""
    if isinstance(x, int) and not isinstance(x, bool):
        return int(x), 0.0
    return 0, float(x)
