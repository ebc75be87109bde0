"""Graph rewrite to a packed per-layer KV cache for head-adaptive / per-layer SnapKV (``ops/adakv_ref.py``).

Why packed: Ada-KV gives the heads of a layer different lengths. The per-head slot buffers of the
other eviction passes ([B, Hk, S_l, D]) are padded to the longest head, so an adaptive split would
hold Hk * max_h n_h slots. Here a layer holds one buffer k, v [B, 1, N, D] with N = sum_h n_h (plus
batch padding to the longest row) and per-head positions [B, Hk, N] (-1 where a slot belongs to
another head): the bytes held are the bytes kept. The attention reads the cached slots expanded to Hk
heads (each head's mask hides the other heads' slots) concatenated with this step's new tokens in
the dense per-head layout: a prompt on an empty cache is then plain dense causal attention (the
fast SDPA path, no per-head mask over Hk*T keys). Run literally, a decode step would copy the cache
expanded to Hk heads and each KV head would read all N slots; every runtime instead lowers a one-token
step to attention over the appended packed buffer ``k_all`` (read once, each query head masked to its
KV head's slots): torch and compiled ``codegen/torch/packed_attention.py``, ONNX Runtime
``codegen/onnx/packed_decode.py``.

Per rewritten layer (dense layers only; latent layers share one row across heads and are refused)::

    k_all  = cat([k_cache_l, pack_heads(k_new)], 2)                       # [B, 1, N + Hk*T, D], same for v
    kp_all = cat([key_positions_l, packed_positions(positions, Hk)], 2)   # [B, Hk, N + Hk*T]
    out    = graphwright.attention(q, cat([k_cache_l.expand(-1, Hk, -1, -1), k_new], 2), (same for v), positions,
                                   cat([key_positions_l, positions[:, None].expand(-1, Hk, -1)], 2), ...)
    k', v', key_positions_l' = graphwright.evict_adakv(q, k_all, v_all, positions, kp_all, scale, ...)
"""

from __future__ import annotations

import dataclasses

import torch

from ..capture.step_graph import StateSpec
from ..errors import RecipeError
from ..ops import schema
from ..ops.graph_match import cat_dim, cat_parts
from ..ops.policy_adakv import EVICT_ADAKV, PACK_HEADS, PACKED_POSITIONS
from .eviction_common import (StateEditor, call, find_sites, insert_outputs, positions_name, positions_node, site_kv_heads,
                              tag)


def _pack_cache(graph, ed, site, cat_node, name: str, hk: int):
    """cat([cache, new]) -> cat([cache, pack_heads(new)]) and the state's shape -> [B, 1, 0, D]; returns what
    the attention reads: cat([cache expanded to Hk heads, new], 2) [B, Hk, N + T, D]."""
    cache, new = cat_parts(cat_node)
    dim = cat_dim(cat_node)
    with graph.inserting_before(cat_node):
        packed = call(graph, PACK_HEADS, new)
        wide = call(graph, torch.ops.aten.cat.default, [call(graph, torch.ops.aten.expand.default, cache, [-1, hk, -1, -1]), new], dim)
    cat_node.args = ([cache, packed], dim)
    e = ed.find(name)
    shape = list(e[0].shape)
    shape[1] = 1
    e[0] = dataclasses.replace(e[0], shape=tuple(shape))
    return wide


def rewrite_packed(sg, variant: str, params: dict, layers=None, op=EVICT_ADAKV, site_values=None,
                   slot_state: tuple = (), layer_args: bool = True) -> list[int]:
    """Give each selected layer a packed cache and ``op`` (default ``evict_adakv``; ``params``: its scalar
    parameters but ``layer``/``num_layers``, which are filled in here unless ``layer_args=False``;
    ``site_values(sg, site)``: per-layer extra arguments, e.g. the rotary table; ``slot_state``: (op argument,
    state prefix, dtype) of per-slot state [B, 1, N] compacted with the packed cache, state ``<prefix><layer>``,
    read after ``k_pos`` and returned after it). Returns the rewritten layer indices."""
    sites = find_sites(sg, layers)
    if isinstance(sites, str):
        raise ValueError(sites)
    latent = [s.layer for s in sites if s.latent]
    if latent:
        raise RecipeError(f"{variant}: layers {latent} hold a latent cache (lowrank_kv): one latent row serves every KV "
                          "head, so per-head budgets cannot free memory there; run the head-adaptive/pyramid snapkv "
                          "without lowrank_kv, or with layers= excluding those layers")
    ed = StateEditor(sg)
    graph = sg.gm.graph
    pos = positions_node(sg)
    done = []
    for site in sites:
        hk = site_kv_heads(sg, ed, site)  # duo's retrieval part: its H_ret heads are packed, not the layer's Hk
        kp_in = ed.add(StateSpec(positions_name(site.layer), "positions", (-1, hk, 0), torch.long, seq_dim=2, layer=site.layer))
        with graph.inserting_before(site.attn):
            kp_all = call(graph, torch.ops.aten.cat.default, [kp_in, call(graph, PACKED_POSITIONS, pos, hk)], 2)
            per_head = call(graph, torch.ops.aten.expand.default, call(graph, torch.ops.aten.unsqueeze.default, pos, 1), [-1, hk, -1])
            kp_att = call(graph, torch.ops.aten.cat.default, [kp_in, per_head], 2)
        k_view = _pack_cache(graph, ed, site, site.k_cat, site.k_name, hk)
        v_view = _pack_cache(graph, ed, site, site.v_cat, site.v_name, hk)
        schema.set(site.attn, "k", k_view)
        schema.set(site.attn, "v", v_view)
        schema.set(site.attn, "k_pos", kp_att)
        values = dict(q=site.arg("q"), k=site.k_cat, v=site.v_cat, q_pos=site.arg("q_pos"), k_pos=kp_all,
                      scale=site.arg("scale"), **params)
        if layer_args:
            values.update(layer=site.layer, num_layers=sg.info.num_layers)
        extra = [(f"{prefix}{site.layer}", ed.add(StateSpec(f"{prefix}{site.layer}", "positions", (-1, 1, 0), dtype,
                                                            seq_dim=2, layer=site.layer)))
                 for _, prefix, dtype in slot_state]
        values.update({arg: node for (arg, _, _), (_, node) in zip(slot_state, extra)})
        if site_values is not None:
            values.update(site_values(sg, site))
        with graph.inserting_after(site.attn):
            node = schema.call(graph, op, **values)
        tag(node, site, "kv_evict", variant)
        k_out, v_out, kp_out, *state_out = insert_outputs(graph, node, 3 + len(slot_state))
        ed.set_output(site.k_name, k_out)
        ed.set_output(site.v_name, v_out)
        ed.set_output(positions_name(site.layer), kp_out)
        for (name, _), out in zip(extra, state_out):
            ed.set_output(name, out)
        site.attn.meta.setdefault("graphwright", {})["variant"] = variant
        done.append(site.layer)
    ed.finish()
    return done
