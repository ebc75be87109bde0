"""The graph rewrite shared by KV-eviction passes (H2O, SnapKV, FastGen, StreamingLLM).

A pass is a few lines: ``rewrite_layers(sg, name, evict_pass_build(POLICY, params), self.layer_set(sg.info))``.
``evict_pass_build``/``insert_policy`` insert the policy's op (``ops/eviction_policy.py``), add its
state by the names the policy declares and map its outputs by name. Attention arguments are read
and written by name (``ops/schema.py``). ``layers=`` (``LAYERS_ARG``, ``EvictionPass.layer_set``)
restricts a pass to some layers: only those are inspected and rewritten, so different policies can
own different layers (each layer has its own per-head positions state).

Captured layout, per layer l::

    k_all = cat([k_cache_l, k_new], 2)          # [B, Hk, S + T, D], same for v
    out   = graphwright.attention(q, k_all, v_all, positions, key_pos_all, scale, window)
    state outputs: key_pos_all = cat([key_positions, positions], 1) (shared [B, S]), k_all, v_all

After the rewrite, per evicted layer::

    key_pos_all_l = cat([key_positions_l, positions[:, None].expand(-1, Hk, -1)], 2)   # [B, Hk, S_l + T]
    out = graphwright.attention(q, k_all, v_all, positions, key_pos_all_l, ...)      # op accepts per-head k_pos
    k', v', key_positions_l', *aux' = graphwright.evict_<policy>(q, k_all, v_all, positions, key_pos_all_l, *aux, ...)

Invariants tested: ``tests/passes/test_eviction_layers.py`` (two policies on two layers compile and
generate in either pass order, each layer keeps its policy's set; out-of-range layers raise
``RecipeError``), ``test_eviction_policy.py`` (a toy policy runs through ``evict_pass_build``).

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
from typing import Callable

import torch

from ..capture.ops import ATTENTION
from ..capture.step_graph import StateSpec
from ..ops import schema
from ..ops.eviction import LATENT_KEYS
from ..ops.eviction_policy import EvictionPolicy
from ..ops.latent_attention import LATENT_ATTENTION
from .base import Arg, Pass
from .match import LayerSite, cache_concat, layer_site
from .selection import parse_layer_heads

SHARED_POSITIONS = "key_positions"
EVICT_INPUTS = ("q", "k", "v", "q_pos", "k_pos", "scale")  # what rewrite_layers prepares for a policy op
LAYERS_ARG = Arg("layers", list, None, "layer indices to evict (default: all layers)")
HEADS_ARG = Arg("heads", str, "uniform", "per-head budgets; only uniform here (adaptive: snapkv, h2o)", choices=("uniform", "adaptive"))


def refuse_adaptive_heads(name: str, heads: str) -> None:
    """``RecipeError`` for ``heads="adaptive"`` on FastGen.

    Ada-KV (arXiv 2407.11550) shares one layer budget Hk*C across the heads by a score that is
    comparable across heads. FastGen (arXiv 2310.01801) has no layer budget to share: each head's
    size follows from the compression policy its prompt profiling picked (special / punct /
    frequent / local / full, the cheapest that recovers ``recovery`` of the attention mass), so a
    head's size is already its own, and its 'frequent' scores are only ranked within heads whose
    policy keeps them. ``h2o(heads='adaptive')`` / ``evict(score='h2o'|'tova', rule='adaptive',
    when='decode')`` are the decode-time head-adaptive policies (``ops/adakv_decode.py``).
    """
    if heads == "adaptive":
        from ..errors import RecipeError

        raise RecipeError(f"{name}(heads='adaptive') is not supported: FastGen has no layer budget to share across "
                          "heads (each head's size follows from the policy its prompt profiling picks: special, punct, "
                          "frequent, local or full, by recovered attention mass), so Ada-KV's split has nothing to "
                          f"spread. Use h2o(heads='adaptive', floor=0.2) or snapkv(heads='adaptive'), or {name} with "
                          "heads='uniform'")


def select_layers(pass_name: str, layers, num_layers: int) -> list[int]:
    """Sorted layer indices of a ``layers=`` recipe value (None = all); ``RecipeError`` naming the valid range."""
    return sorted(parse_layer_heads(pass_name, num_layers, layers=layers, repeats=False))


class EvictionPass(Pass):
    """What every eviction pass shares: its pass-manager declarations, ``layers=``, ``layer_set``, ``applies_to``."""

    needs = frozenset({"attention", "shared_positions"})
    produces = frozenset({"evicted"})
    removes = frozenset({"shared_positions", "dense_cache"})
    # scores are the model's own attention; steering is added after; think prunes the channels of the kept keys
    forbids = frozenset({"key_bias", "channel_pruned"})
    excludes = {"evicted": "one eviction policy per layer (give each policy its own layers=[...])"}
    stage = 60

    def layer_set(self, info) -> set[int]:
        """The layers this pass evicts (``RecipeError`` for an index outside 0..num_layers-1)."""
        return set(select_layers(self.name, self.values.get("layers"), info.num_layers))

    def applies_to(self, sg) -> str | None:
        why = self.duo_refusal(sg)
        if why:
            return why
        sites = find_sites(sg, self.target_layers(sg))
        return sites if isinstance(sites, str) else None

    @property
    def on_duo(self) -> bool:
        """Whether this pass may evict ``duo``'s retrieval part (it declares ``also_on`` the fact ``retrieval_part``)."""
        return "retrieval_part" in self.also_on

    def target_layers(self, sg) -> set[int]:
        """``layers=`` (default all); after duo, only the layers with retrieval heads (all-streaming layers are duo's)."""
        duo = retrieval_layers(sg)
        return self.layer_set(sg.info) if duo is None or not self.on_duo else self.layer_set(sg.info) & duo

    def duo_refusal(self, sg) -> str | None:
        """After duo: ``layers=`` naming an all-streaming layer (nothing of the retrieval kind to evict there)."""
        duo = retrieval_layers(sg)
        if duo is None or not self.on_duo or self.values.get("layers") is None:
            return None
        streaming = sorted(self.layer_set(sg.info) - duo)
        if streaming:
            return (f"layer(s) {streaming}: every KV head there is a duo streaming head (sinks + window), so there is no "
                    f"retrieval cache to evict; give layers= among duo's layers with retrieval heads {sorted(duo)}")
        return None

    def note_on_duo(self, sg, layers: list[int], on: str) -> None:
        """Record in ``sg.notes["duo"][name]`` what this pass did to duo's retrieval part (nothing when duo has not run)."""
        duo = retrieval_layers(sg)
        if duo is not None:  # a new dict: step-graph copies share the notes' values
            sg.notes["duo"] = {**sg.notes["duo"], self.name: {
                "layers": layers, "on": on, "all_streaming_layers_left_to_duo": sorted(set(range(sg.info.num_layers)) - duo)}}


RETRIEVAL_PART = {"retrieval_part": "after duo, it evicts the retrieval heads' cache (their own attention node); "
                                    "streaming heads keep sinks + window"}


def retrieval_layers(sg) -> set[int] | None:
    """Layers where ``duo`` left retrieval heads (split or all-retrieval); None when duo has not run."""
    duo = sg.notes.get("duo")
    return None if duo is None else {layer for layer, part in duo["per_layer"].items() if part["retrieval"]}


def positions_name(layer: int) -> str:
    """Name of a layer's per-head positions state (the runtime counts kept tokens from these)."""
    return f"{SHARED_POSITIONS}{layer}"


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
        (outs,) = self.out_node.args  # the output node: (logits, *state, *rest)
        outs = list(outs)
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

    def finish(self):
        """The end of an eviction rewrite: drop the shared positions if unread, commit, clean and recompile the graph."""
        self.drop_unused_shared_positions()
        self.commit()
        self.graph.eliminate_dead_code()
        self.graph.lint()
        self.sg.gm.recompile()


def eviction_site(ed: StateEditor, node) -> LayerSite | str:
    """``match.layer_site`` plus what eviction needs: no key bias yet, the shared key positions."""
    where = f"layer {schema.layer_of(node)}"
    if schema.get(node, "key_bias", None) is not None:
        return f"{where}: attention has a key_bias (steering); apply eviction before steer"
    site = layer_site(ed.sg, node)
    if not site:
        return site.reason
    kp = cache_concat(schema.get(node, "k_pos"))
    shared = ed.find(SHARED_POSITIONS)
    if shared is None or not kp or kp.cache is not shared[1]:
        return f"{where}: key positions are already per layer (an eviction pass applies once)"
    return site


def find_sites(sg, layers=None) -> list[LayerSite] | str:
    """The sites of the chosen layers (all when ``layers`` is None), sorted by layer, or the first
    reason one cannot be rewritten. Layers outside ``layers`` are not inspected."""
    # duo's streaming heads already evict (sinks + window); its retrieval part is an ordinary site (``also_on``)
    nodes = [n for n in sg.nodes(ATTENTION) + sg.nodes(LATENT_ATTENTION) if not is_duo_streaming(n)]
    if not nodes:
        return "the graph has no graphwright.attention or graphwright.latent_attention nodes to evict from"
    if layers is not None:
        have = {schema.layer_of(n) for n in nodes}
        missing = sorted(set(layers) - have)
        if missing:
            return (f"layer(s) {missing} have no graphwright.attention or graphwright.latent_attention node "
                    f"(layers with one: {sorted(x for x in have if x is not None)})")
        nodes = [n for n in nodes if schema.layer_of(n) in layers]
    ed = StateEditor(sg)
    sites = []
    for n in nodes:
        site = eviction_site(ed, n)
        if isinstance(site, str):
            return site
        sites.append(site)
    return sorted(sites, key=lambda s: s.layer)


def is_duo_streaming(node) -> bool:
    """An attention node of ``duo``'s streaming heads (a split layer's part, or a layer whose heads all stream)."""
    return (node.meta.get("graphwright") or {}).get("variant") == "duo_streaming"


def site_kv_heads(sg, ed: StateEditor, site: LayerSite) -> int:
    """KV heads of a site's cache: its state's head dim (``duo``'s retrieval part holds a subset), or every KV
    head (a latent cache has no head dim)."""
    return sg.info.num_kv_heads if site.latent else int(ed.find(site.k_name)[0].shape[1])


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
    """Give each selected layer (all when ``layers`` is None) per-head positions state and the policy's node.

    Before ``build`` runs, ``site.inputs`` holds the policy op's q, k, v, q_pos, k_pos (the per-head
    positions) and scale. ``build(sg, ed, site, key_pos_all)`` inserts the eviction node after
    ``site.attn`` (adding any extra state with ``ed.add``; it may replace the attention node, then it
    sets ``site.attn``) and returns the new output node of every state it owns (k, v, per-head
    positions, extras). Layers outside ``layers`` are neither inspected nor changed. Returns the
    rewritten layer indices.
    """
    sites = find_sites(sg, layers)
    if isinstance(sites, str):
        raise ValueError(sites)
    ed = StateEditor(sg)
    graph = sg.gm.graph
    pos = positions_node(sg)
    done = []
    for site in sites:
        hk = site_kv_heads(sg, ed, site)
        kp_in = ed.add(StateSpec(positions_name(site.layer), "positions", (-1, hk, 0), torch.long, seq_dim=2, layer=site.layer))
        with graph.inserting_before(site.attn):
            # this step's positions, one copy per KV head: [B, T] -> [B, Hk, T]
            per_head = call(graph, torch.ops.aten.expand.default, call(graph, torch.ops.aten.unsqueeze.default, pos, 1), [-1, hk, -1])
            kp_all = call(graph, torch.ops.aten.cat.default, [kp_in, per_head], 2)
        site.inputs = {name: site.arg(name) for name in EVICT_INPUTS}
        attn_kp = kp_all
        if site.latent:
            with graph.inserting_before(site.attn):
                # every head holds the same (union) set: head 0's positions are the latent rows' positions
                attn_kp = call(graph, torch.ops.aten.select.int, kp_all, 1, 0)  # [B, S_l + T]
                site.inputs["k"] = latent_keys(sg, site, attn_kp)
                payload = call(graph, torch.ops.aten.cat.default, [site.arg("c_k"), site.arg("c_v")], -1)
                site.inputs["v"] = call(graph, torch.ops.aten.unsqueeze.default, payload, 1)  # [B, 1, S, r_k + r_v]
        schema.set(site.attn, "k_pos", attn_kp)
        site.inputs["k_pos"] = kp_all
        for name, node in build(sg, ed, site, kp_all).items():
            ed.set_output(name, node)
        meta = site.attn.meta.setdefault("graphwright", {})
        meta["variant"] = f"{meta['variant']}+{variant}" if site.latent and meta.get("variant") else variant
        done.append(site.layer)
    ed.finish()
    return done


def latent_keys(sg, site: LayerSite, k_pos, **override) -> torch.fx.Node:
    """``graphwright.latent_keys`` of a latent layer [B, Hk, S, D] fp32, its arguments taken by name from the
    layer's latent attention node (``override``: e.g. ``inv_freq=None`` for pre-RoPE keys)."""
    values = {name: site.arg(name) for name in schema.arg_names(LATENT_KEYS)
              if name in schema.arg_names(site.attn.target)}
    values.update(k_pos=k_pos, head_dim=sg.info.head_dim, **override)
    return schema.call(sg.gm.graph, LATENT_KEYS, **values)


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


def insert_policy(sg, ed, site: LayerSite, policy: EvictionPolicy, params: dict, widths: dict | None = None, **inputs) -> dict:
    """Insert ``policy``'s op after the layer's attention node; returns ``{state name: output node}``.

    The op's q, k, v, q_pos, k_pos, scale come from ``site.inputs`` unless given in ``inputs``; its
    per-slot and per-head state are added as state ``<prefix><layer>`` by the names the policy
    declares (``widths[arg]``: the trailing width W of a ``trailing`` slot state); its per-step
    inputs (``policy.step_inputs``) must be given in ``inputs``; ``params`` are its scalar
    parameters by name. Outputs are mapped by name, never by index.
    """
    graph, layer, hk = sg.gm.graph, site.layer, site_kv_heads(sg, ed, site)
    wanted = policy.arg_names()
    values = {name: site.inputs[name] for name in EVICT_INPUTS if name in wanted}
    values.update(inputs)
    state = {}
    for s in policy.slot_state:
        if s.trailing and (widths or {}).get(s.arg) is None:
            raise ValueError(f"evict_{policy.name}: slot state {s.arg!r} has a trailing width; pass widths={{{s.arg!r}: W}}")
        width = (widths[s.arg],) if s.trailing else ()
        values[s.arg] = state[s.arg] = aux_state(ed, site, s.prefix, s.dtype, hk, width)
    for s in policy.head_state:
        values[s.arg] = state[s.arg] = ed.add(StateSpec(f"{s.prefix}{layer}", "positions", (-1, hk, 0), s.dtype,
                                                        seq_dim=2, layer=layer))
    missing = [s.arg for s in policy.step_inputs if s.arg not in values]
    if missing:
        raise ValueError(f"evict_{policy.name} needs per-step input(s) {missing} from the pass")
    values.update(params)
    with graph.inserting_after(site.attn):
        node = schema.call(graph, policy.op, **values)
    tag(node, site, "kv_evict", policy.name)
    outs = dict(zip(policy.outputs(), insert_outputs(graph, node, len(policy.outputs()))))
    result = {**cache_outputs(sg, site, outs["k"], outs["v"]), positions_name(layer): outs["k_pos"]}
    for s in (*policy.slot_state, *policy.head_state):
        result[f"{s.prefix}{layer}"] = outs[s.arg]
    return result


def evict_pass_build(policy: EvictionPolicy, params: dict, widths: dict | None = None, **inputs) -> BuildFn:
    """The ``build`` of a pass that only inserts ``policy``'s op (H2O, SnapKV, FastGen)."""
    def build(sg, ed, site, kp_all):
        return insert_policy(sg, ed, site, policy, params, widths, **inputs)

    return build


def aux_state(ed, site, name: str, dtype, hk: int, width: tuple = ()) -> torch.fx.Node:
    """A per-slot bookkeeping state [B, Hk, S_l] (or [B, Hk, S_l, *width]; kind "positions": counted as
    index bytes, not KV)."""
    return ed.add(StateSpec(f"{name}{site.layer}", "positions", (-1, hk, 0, *width), dtype, seq_dim=2, layer=site.layer))


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
