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
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch

from ..capture.ops import ATTENTION
from ..capture.step_graph import StateSpec

ATTN_ARGS = ("q", "k", "v", "q_pos", "k_pos", "scale", "window", "key_bias")
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

    def arg(self, name):
        return self.args.get(name)


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
    d = {name: a for name, a in zip(ATTN_ARGS, node.args)}
    d.update(node.kwargs)
    return d


def locate_layer(ed: StateEditor, node) -> LayerSite | str:
    """The layer's cache placeholders, or the reason the layout is not the captured dense one."""
    layer = node.meta.get("graphwright", {}).get("layer")
    args = attention_args(node)
    where = f"layer {layer}"
    if args.get("key_bias") is not None:
        return f"{where}: attention has a key_bias (steering); apply eviction before steer"
    caches = []
    for name in ("k", "v"):
        cat = args[name]
        if not (isinstance(cat, torch.fx.Node) and cat.target is torch.ops.aten.cat.default
                and len(cat.args[0]) == 2 and cat.args[1] in (2, -2)):
            return f"{where}: attention {name} is not cat([cache, new], 2) (already rewritten?)"
        e = ed.by_placeholder(cat.args[0][0])
        if e is None or e[0].kind != "kv":
            return f"{where}: attention {name} does not read a kv state input"
        caches.append(e)
    kp = args["k_pos"]
    shared = ed.find(SHARED_POSITIONS)
    if shared is None or not (isinstance(kp, torch.fx.Node) and kp.target is torch.ops.aten.cat.default
                              and kp.args[0][0] is shared[1]):
        return f"{where}: key positions are already per layer (an eviction pass applies once)"
    return LayerSite(layer, node, args, caches[0][1], caches[1][1], caches[0][0].name, caches[1][0].name)


def find_sites(sg) -> list[LayerSite] | str:
    """Every attention layer's site (sorted by layer), or the first reason one cannot be rewritten."""
    nodes = sg.nodes(ATTENTION)
    if not nodes:
        return "the graph has no graphwright.attention nodes (latent or other attention cannot be evicted yet)"
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
        i = ATTN_ARGS.index("k_pos")
        if i < len(site.attn.args):
            site.attn.update_arg(i, kp_all)
        else:
            site.attn.update_kwarg("k_pos", kp_all)
        site.args["k_pos"] = kp_all
        for name, node in build(sg, ed, site, kp_all).items():
            ed.set_output(name, node)
        meta = site.attn.meta.setdefault("graphwright", {})
        meta["variant"] = variant
        done.append(site.layer)
    ed.drop_unused_shared_positions()
    ed.commit()
    graph.eliminate_dead_code()
    graph.lint()
    sg.gm.recompile()
    return done


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


def frac_or_count(x) -> tuple[int, float]:
    """Recipe value -> (count, fraction): an int >= 1 is a token count, a float is a fraction of the length."""
    if isinstance(x, int) and not isinstance(x, bool):
        return int(x), 0.0
    return 0, float(x)
