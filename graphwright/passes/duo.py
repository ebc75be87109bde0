"""``duo``: DuoAttention (arXiv 2410.10819) -- retrieval heads keep every token, streaming heads sinks + window.

Technique (reference code ``mit-han-lab/duo-attention``, ``forward_one_way_reordered``; spec in
ALGORITHMS-2.md section 2). Every KV head is either a *retrieval* head, which keeps its full
cache, or a *streaming* head, which keeps the first ``sinks`` tokens and the last ``window``
tokens. Query heads of a GQA group follow their KV head. Which heads retrieve comes from a head
set (``passes/duo_select.py``: the shipped one by default, a file, a fraction by score or a list).

Graph change, per layer with both kinds of head (a *split* layer)::

    k_ret = cat([k_cache_l, k_new[:, R]], 2)                       # state k_cache_l now [B, H_ret, S, D]
    k_str = cat([duo_k_l, k_new[:, T]], 2)                         # new state duo_k_l [B, H_str, <= sinks + window, D]
    kp_str = cat([duo_positions_l, positions per streaming head], 2)
    out = index_select(cat([attention(q[:, q(R)], k_ret, v_ret, ..., key_positions_all),
                            attention(q[:, q(T)], k_str, v_str, ..., kp_str)], 1), 1, model head order)
    duo_k_l', duo_v_l', duo_positions_l' = graphwright.evict_streaming(k_str, v_str, positions, kp_str, sinks, window)

(``index_select`` where the layer's projections cannot be permuted; where they can, ``duo_permute.py`` orders
the heads retrieval-first in the q/k/v/o weights, the selections become one split per tensor and the final re-ordering
vanishes: exact, fewer nodes per step), so the two caches are separate state tensors of their own widths (``kv_bytes`` counts both; a
streaming head is never padded to a retrieval head's length). A layer whose heads all stream is
the ``streaming`` eviction policy on the whole layer (``eviction_common.rewrite_layers``) with the
model's own RoPE (keys cached rotated at their original positions, never re-rotated, unlike the
``streaming`` pass); a layer whose heads all retrieve is left as captured. The eviction op runs
after the attention, so a one-shot prefill is dense causal for every head (the first token is
exact) and the streaming caches are cut right after it; every decode step appends its token and
trims again (the torch backend does this in place on slots, ``codegen/torch/eviction_slots.py``).

A decode query at position i therefore sees, on a streaming head, keys j with j < sinks or
i - j <= window (the ``window`` cached recent tokens plus itself: the reference's
[sink | recent | current]); the oracle mask is causal AND (retrieval(h) OR j < sinks OR i - j < window + 1).

Composition with eviction (fact ``retrieval_part``, ``passes/manager.py`` ``also_on``; ``EvictionPass``
``target_layers``/``note_on_duo``): duo runs first, in either written order; a split layer's retrieval
part is an ordinary dense head-subset attention site (cat([k_cache_l, new], 2) over H_ret heads, the
shared key positions), so an eviction pass rewrites it like a whole layer of H_ret heads: ``snapkv``
compresses the retrieval heads' prompt once after prefill (question-aware window, per retrieval KV
head), decode appends; ``snapkv(heads="adaptive")`` / ``evict(rule="adaptive")`` pack the retrieval
heads of the layer into one Ada-KV cache (H_ret * budget prompt slots spread by score over the
retrieval heads only, ``packed_rewrite.py``); ``h2o`` and ``evict(score=..., when="decode"|...)``
evict the retrieval heads' cache after prefill and every step (their per-head scores of width H_ret).
An all-retrieval layer gets the pass as without duo; an all-streaming layer stays duo's alone
(``sg.notes["duo"][<pass>]`` lists both). Exact: the eviction pass's exact setting gives duo alone,
every head retrieval gives the eviction pass alone. Refused, with the reason: ``fastgen`` (not
implemented on the retrieval part), ``pyramid`` budgets, evict's delegated scorers (keyformer,
scissorhands), ``chunk_reuse`` and ``block=``; and ``streaming``: duo's streaming heads already are
sinks + window, streaming on every head is ``streaming`` alone, and sinks + a larger window on the
retrieval heads is ``evict(score="h2o", budget=S+W, sinks=S, window=W)`` after duo (keys at their
original positions, no re-rotation).

Composition with ``lowrank_kv`` (``also_on = {"latent_cache": ...}``): lowrank_kv runs first; a split
latent layer is factored again per head group, two latent caches (``passes/duo_latent.py``, tested in
``tests/passes/test_duo_lowrank.py``); an all-streaming latent layer evicts its latent rows.

Exact settings: every head retrieval (nothing changes), or sinks + window >= the sequence length.
Invariants tested (``tests/passes/test_duo.py``): both exact settings give the dense logits and
tokens; duo's logits equal dense attention under that mask over 60 decode steps (tiny Llama,
batch 2 left-padded, split and all-streaming layers); ``kv_bytes`` equals the two caches' sizes;
the retrieval argument forms and their errors. ``tests/passes/test_duo_snapkv.py``: duo + snapkv equals
dense attention under the combined mask (SnapKV's kept prompt set on retrieval heads, sinks + window on
streaming heads) over 56 decode steps, both exact settings, its kv_bytes, refusals and the CLI.
ONNX: ``tests/onnx/test_duo_packed_onnx.py`` (duo and duo + snapkv in ONNX Runtime vs torch).
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch

from ..capture.ops import ATTENTION
from ..capture.step_graph import StateSpec
from ..errors import RecipeError
from ..ops import schema
from ..ops.policy_streaming import STREAMING_POLICY
from .base import MAX_TOKENS, Arg, Pass, PassContext, Tunable, register_pass
from .duo_latent import drop_unused_factors, split_inputs_rms, split_latent_layer
from .duo_permute import permute_layer
from .duo_select import resolve_retrieval
from .eviction_common import (StateEditor, call, evict_pass_build, find_sites, insert_outputs, positions_node,
                              rewrite_layers, tag)
from .match import cat_parts
from .match import source as input_of  # run() binds "source" to where the head set came from

aten = torch.ops.aten
STREAM_K, STREAM_V, STREAM_POS = "duo_k", "duo_v", "duo_positions"  # + layer index: a split layer's streaming state


@register_pass
class Duo(Pass):
    name = "duo"
    needs = frozenset({"dense_attention", "dense_cache", "shared_positions"})
    produces = frozenset({"evicted", "head_split", "retrieval_part"})  # retrieval_part: an eviction pass may evict it
    removes = frozenset({"dense_cache", "shared_positions"})
    also_on = {"latent_cache": "a split latent layer is factored again per head group (two latent caches, "
                               "passes/duo_latent.py); an all-streaming latent layer evicts its latent rows"}
    forbids = frozenset({"key_bias"})  # steering's bias would have to be split by head too
    excludes = {
        "evicted": "duo already decides what every head keeps (retrieval: all, streaming: sinks + window); only snapkv, "
                   "h2o and evict compose, evicting the retrieval heads' cache; fastgen is not implemented on the retrieval "
                   "part; streaming is refused: duo's streaming heads already are sinks + window, streaming on every head is "
                   "streaming(...) alone, and a larger sinks + window on the retrieval heads is "
                   "evict(score='h2o', budget=S+W, sinks=S, window=W) after duo (keys keep their positions, no re-rotation)",
        "head_split": "duo splits each layer's attention by its own head set and cannot re-split a layer another pass split",
    }
    stage = 60
    examples = {"exact": "duo(retrieval=[[0, 0]], sinks=4, window=1000)", "lossy": "duo(retrieval=[[0, 1]], sinks=2, window=4)",
                "models": ("tiny-llama", "tiny-qwen2"), "first_token_dense": True}
    exact = False
    doc = "DuoAttention: retrieval KV heads keep the full cache, streaming KV heads only sinks + a recent window."
    args = (
        Arg("retrieval", (str, float, list), None, "retrieval KV heads: a head-set file, a fraction 0..1 of the shipped "
            "head set by score, 'auto', or [[layer, kv_head], ...] (default: the shipped head set)", min=0, max=1,
            tune=Tunable("float", 0.05, 1.0, scope="head", head_form="pairs")),
        Arg("sinks", int, 4, "first tokens every streaming head keeps (attention sinks)", min=0, max=MAX_TOKENS),
        Arg("window", int, 256, "most recent tokens every streaming head keeps", min=1, max=MAX_TOKENS,
            tune=Tunable("int", 0.05, 1.0, per_context=True)),
    )

    def applies_to(self, sg) -> str | None:
        sites = find_sites(sg)
        return sites if isinstance(sites, str) else None

    def run(self, sg, ctx: PassContext):
        info = sg.info
        retrieval, source = resolve_retrieval(self.retrieval, info, ctx)
        sites = find_sites(sg)
        if isinstance(sites, str):
            raise RecipeError(f"duo: {sites}")
        params = {"sinks": self.sinks, "window": self.window}
        per_layer, split, stream, latent_ranks = {}, [], set(), {}
        ed = StateEditor(sg)
        rms = split_inputs_rms(sg, [s for s in sites if s.latent and 0 < sum((s.layer, h) in retrieval for h in
                                                                          range(info.num_kv_heads)) < info.num_kv_heads], ctx)
        for site in sites:
            ret = [h for h in range(info.num_kv_heads) if (site.layer, h) in retrieval]
            strm = [h for h in range(info.num_kv_heads) if h not in ret]
            per_layer[site.layer] = {"retrieval": ret, "streaming": strm}
            if ret and strm and site.latent:
                x = input_of(cat_parts(site.k_cat)[1])  # the latent projection's input
                latent_ranks[site.layer] = split_latent_layer(sg, ed, site, ret, strm, params, rms.get(x))
                split.append(site.layer)
            elif ret and strm:
                split_layer(sg, ed, site, ret, strm, params)
                split.append(site.layer)
            elif strm:
                stream.add(site.layer)
        ed.commit()
        sg.gm.graph.eliminate_dead_code()
        drop_unused_factors(sg, latent_ranks)
        sg.gm.graph.lint()
        sg.gm.recompile()
        if stream:
            rewrite_layers(sg, "duo_streaming", evict_pass_build(STREAMING_POLICY, params), stream)
        n_ret = sum(len(v["retrieval"]) for v in per_layer.values())
        sg.notes["duo"] = {
            "per_layer": per_layer,
            "counts": {"retrieval_heads": n_ret, "streaming_heads": len(sites) * info.num_kv_heads - n_ret,
                       "layers_split": len(split), "layers_streaming": len(stream)},
            "settings": {**params, "retrieval": source, "keys_cached": "post-RoPE, original positions"},
            "show": ["retrieval", "streaming"],
        }
        if latent_ranks:  # lowrank_kv ran first: split layers hold two latent caches of these ranks
            sg.notes["duo"]["latent_ranks"] = latent_ranks
        return sg


def _index(sg, name: str, idx: list) -> torch.fx.Node:
    device = next((t.device for t in sg.gm.parameters()), torch.device("cpu"))
    sg.gm.register_buffer(name, torch.tensor(idx, dtype=torch.long, device=device))
    return sg.gm.graph.get_attr(name)


def _query_heads(kv: list, g: int) -> list:
    return [h for k in kv for h in range(k * g, (k + 1) * g)]


def split_layer(sg, ed: StateEditor, site, ret: list, strm: list, params: dict) -> None:
    """Rewrite one layer with both kinds of head (module docstring): retrieval cache narrowed, streaming cache added."""
    graph, info, layer, attn = sg.gm.graph, sg.info, site.layer, site.attn
    g = info.num_heads // info.num_kv_heads
    a = schema.bound(attn)
    k_new, v_new = site.k_new, cat_parts(site.v_cat)[1]
    pre = f"gw_duo_l{layer}"
    # heads permuted in the weights, retrieval first (duo_permute.py): each group a contiguous block, no gathers
    permuted = permute_layer(sg, layer, a["q"], k_new, v_new, attn, ret + strm, g)
    halves = {}

    def pick(t, kind, heads, idx):
        if permuted:  # [retrieval | streaming] along the head dim: one split per tensor (ONNX Split), made at first use
            if t not in halves:
                parts = call(graph, aten.split_with_sizes.default, t, [heads * len(ret), heads * len(strm)], 1)
                halves[t] = [call(graph, operator.getitem, parts, i) for i in (0, 1)]
            return halves[t][kind == "str"]
        return call(graph, aten.index_select.default, t, 1, idx)

    with graph.inserting_before(site.k_cat):
        if not permuted:
            ret_kv, str_kv = _index(sg, f"{pre}_ret_kv", ret), _index(sg, f"{pre}_str_kv", strm)
            ret_q, str_q = _index(sg, f"{pre}_ret_q", _query_heads(ret, g)), _index(sg, f"{pre}_str_q", _query_heads(strm, g))
            order = _query_heads(ret, g) + _query_heads(strm, g)
            inv = _index(sg, f"{pre}_order", sorted(range(len(order)), key=order.__getitem__))
        else:
            ret_kv = str_kv = ret_q = str_q = inv = None
        k_ret_new = pick(k_new, "ret", 1, ret_kv)
    with graph.inserting_before(site.v_cat):
        v_ret_new = pick(v_new, "ret", 1, ret_kv)
    site.k_cat.replace_input_with(k_new, k_ret_new)
    site.v_cat.replace_input_with(v_new, v_ret_new)
    for name in (site.k_name, site.v_name):  # the retrieval cache keeps its state, narrowed to H_ret heads
        entry = ed.find(name)
        entry[0] = replace(entry[0], shape=(entry[0].shape[0], len(ret), *entry[0].shape[2:]))
    k_spec, v_spec = ed.find(site.k_name)[0], ed.find(site.v_name)[0]
    k_ph = ed.add(replace(k_spec, name=f"{STREAM_K}{layer}", shape=(-1, len(strm), *k_spec.shape[2:]), layer=layer))
    v_ph = ed.add(replace(v_spec, name=f"{STREAM_V}{layer}", shape=(-1, len(strm), *v_spec.shape[2:]), layer=layer))
    p_ph = ed.add(StateSpec(f"{STREAM_POS}{layer}", "positions", (-1, len(strm), 0), torch.long, seq_dim=2, layer=layer))
    extra = {name: a[name] for name in ("window", "sinks") if a.get(name)}  # a native sliding window stays
    with graph.inserting_before(attn):
        pos = positions_node(sg)
        k_str = call(graph, aten.cat.default, [k_ph, pick(k_new, "str", 1, str_kv)], 2)
        v_str = call(graph, aten.cat.default, [v_ph, pick(v_new, "str", 1, str_kv)], 2)
        per_head = call(graph, aten.expand.default, call(graph, aten.unsqueeze.default, pos, 1), [-1, len(strm), -1])
        kp_str = call(graph, aten.cat.default, [p_ph, per_head], 2)
        outs = []
        for kind, qi, k, v, kp in (("retrieval", ret_q, site.k_cat, site.v_cat, a["k_pos"]), ("streaming", str_q, k_str, v_str, kp_str)):
            sub = schema.call(graph, ATTENTION, q=pick(a["q"], kind[:3], g, qi), k=k, v=v,
                              q_pos=a["q_pos"], k_pos=kp, scale=a["scale"], **extra)
            sub.meta.update({key: val for key, val in attn.meta.items() if key in ("nn_module_stack", "stack_trace")})
            sub.meta["graphwright"] = {**attn.meta.get("graphwright", {}), "variant": f"duo_{kind}",
                                       "kv_heads": ret if kind == "retrieval" else strm}
            outs.append(sub)
        out = call(graph, aten.cat.default, outs, 1)  # permuted: the heads' new order, which o_proj now reads
        if not permuted:
            out = call(graph, aten.index_select.default, out, 1, inv)
    attn.replace_all_uses_with(out)
    graph.erase_node(attn)
    with graph.inserting_after(out):
        evict = schema.call(graph, STREAMING_POLICY.op, k=k_str, v=v_str, q_pos=a["q_pos"], k_pos=kp_str, **params)
    site.attn = outs[1]
    tag(evict, site, "kv_evict", "streaming")
    got = dict(zip(STREAMING_POLICY.outputs(), insert_outputs(graph, evict, len(STREAMING_POLICY.outputs()))))
    for name, key in ((f"{STREAM_K}{layer}", "k"), (f"{STREAM_V}{layer}", "v"), (f"{STREAM_POS}{layer}", "k_pos")):
        ed.set_output(name, got[key])
