"""``duo`` on a latent layer (``lowrank_kv`` ran first): two latent caches per split layer.

A latent row is shared by every KV head of its layer, so duo's retrieval heads (every token) and
streaming heads (sinks + window) cannot share one latent cache. A split layer's latent path is
therefore factored again, once per head group g (retrieval R, streaming T), from the layer's LoRC
factors (``lowrank_kv``: K = RoPE(x A_K B_K + b_K), A_K = ``k_down``^T, B_K = ``k_up``):

* keys: the truncated (activation-scaled, as the pass: ASVD arXiv 2312.05821) SVD of
  M_g = A_K B_K[:, heads(g)] ([d, H_g*D]) gives ``k_down_g`` = (U' S)_r^T and ``k_up_g`` = Vh_r;
* values, ``value_path="reconstruct"``: the same for A_V B_V[:, heads(g)] (``v_up_g`` = Vh_r);
* values, ``value_path="absorbed"`` (B_V is already folded into o_proj, W_O'_h = W_O_h B_V,kv(h)^T):
  the SVD of the group's value-to-output map M_g = A_V [W_O'_h^T]_{h in q(g)} ([d, Hq_g*hidden])
  gives ``v_down_g`` = (U' S)_r^T and each query head's new o_proj block Vh_r[:, h]^T
  ([hidden, r_g]); the two groups' outputs are zero-padded to one width, so o_proj stays one linear.

The rank of a group is r_g = round(r_l * H_g / H_kv) (r_l the layer's LoRC rank, so a group keeps the
layer's fraction of its own H_g*D dims), at most min(d, H_g*D, r_l); at full layer rank it is
min(d, H_g*D), so ``keep=1.0`` reproduces ``duo`` alone. Graph per split layer::

    c_ret = cat([k_cache_l, linear(x, k_down_R)], 1)          # state k{l}_latent [B, S, r_R]
    c_str = cat([duo_k_l, linear(x, k_down_T)], 1)            # state duo_k{l} [B, <= sinks + window, r_T]
    out = index_select(cat([latent_attention(q[:, q(R)], c_ret, ...), latent_attention(q[:, q(T)], c_str, ...)], 1), 1, order)
    duo_k_l', duo_v_l', duo_positions_l' = evict_streaming(payload cat([c_str_k, c_str_v], -1)[:, None], ...)

Layers whose heads all stream keep the layer's factors and evict the latent rows (``eviction_common``:
every streaming head keeps the same set, so the latent union is exact); all-retrieval layers stay LoRC.
Tested in ``tests/passes/test_duo_lowrank.py``.
"""

from __future__ import annotations

import torch

from ..capture.step_graph import StateSpec
from ..ops import schema
from ..ops.latent_attention import LATENT_ATTENTION
from ..ops.policy_streaming import STREAMING_POLICY
from .eviction_common import call, insert_outputs, positions_node, tag
from .lowrank_calibrate import input_rms, scaled_svd
from .match import attr_tensor, cat_parts, linear_parts

aten = torch.ops.aten
STREAM_K, STREAM_V, STREAM_POS = "duo_k", "duo_v", "duo_positions"


def group_rank(r_layer: int, d: int, width: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """A head group's rank: the layer's fraction of its own dims, full when the layer is at full rank."""
    cap = min(d, heads * head_dim, r_layer)
    if r_layer >= min(d, width):
        return min(d, heads * head_dim)
    return max(1, min(cap, round(r_layer * heads / kv_heads)))


def _cols(heads: list, dim: int) -> list:
    return [h * dim + i for h in heads for i in range(dim)]


def _down_of(site, which: str):
    """(x, A^T [r, d]) of the layer's new-latent linear (``which``: 'k' or 'v')."""
    cat = site.k_cat if which == "k" else site.v_cat
    lin = cat_parts(cat)[1]
    x, w, _ = linear_parts(lin)
    return x, attr_tensor(lin.graph.owning_module, str(w.target)).double()


def split_inputs_rms(sg, sites, ctx) -> dict:
    """Per-split-layer activation RMS of the latents' input (``scaling="activation"``), else {}."""
    settings = (sg.notes.get("lowrank_kv") or {}).get("settings", {})
    if settings.get("scaling", "activation") != "activation" or not sites:
        return {}
    return input_rms(sg, [_down_of(s, "k")[0] for s in sites], ctx)


def _factor(m: torch.Tensor, s, r: int):
    u, sig, vh = scaled_svd(m, s)
    return (u[:, :r] * sig[:r]).T, vh[:r]  # down^T [r, d], up [r, n]


def _param(sg, name: str, t: torch.Tensor, dtype=None) -> torch.fx.Node:
    gm = sg.gm
    gm.register_parameter(name, torch.nn.Parameter(t.to(dtype or sg.info.dtype).contiguous(), requires_grad=False))
    return gm.graph.get_attr(name)


def _o_linear(node):
    """The o_proj linear reached from ``node`` through single-user reshapes/transposes, and the chain."""
    chain, n = [], node
    for _ in range(6):
        if len(n.users) != 1:
            return None, chain
        (u,) = n.users
        if u.target is aten.linear.default and linear_parts(u)[0] is n:
            return u, chain
        if u.target not in (aten.transpose.int, aten.reshape.default, aten.view.default, aten.clone.default,
                            aten.contiguous.default, aten._unsafe_view.default):
            return None, chain
        chain.append(u)
        n = u
    return None, chain


def split_latent_layer(sg, ed, site, ret: list, strm: list, params: dict, rms) -> dict:
    """Rewrite one latent layer with both kinds of head (module docstring); returns its ranks for the notes."""
    graph, info, layer, attn = sg.gm.graph, sg.info, site.layer, site.attn
    from .duo import _index, _query_heads

    a = schema.bound(attn)
    hk, D, g = info.num_kv_heads, info.head_dim, info.num_heads // info.num_kv_heads
    x, ak_t = _down_of(site, "k")
    _, av_t = _down_of(site, "v")
    gm = sg.gm
    k_up = attr_tensor(gm, str(a["k_up"].target)).double()
    absorbed = a.get("v_up") is None
    d, r_k, r_v = ak_t.shape[1], ak_t.shape[0], av_t.shape[0]
    o_lin, chain = _o_linear(attn)
    if absorbed and o_lin is None:
        raise RuntimeError(f"duo on latent layer {layer}: the absorbed latent attention does not reach an o_proj linear "
                           "through reshapes (use lowrank_kv(value_path='reconstruct'))")
    if absorbed:
        w_o = attr_tensor(gm, str(linear_parts(o_lin)[1].target)).double()  # [hidden, H*r_v]
        hidden = w_o.shape[0]
        w_o_heads = w_o.view(hidden, info.num_heads, r_v)
    else:
        v_up = attr_tensor(gm, str(a["v_up"].target)).double()
        dv = v_up.shape[1] // hk
    pre = f"gw_duo_l{layer}"
    ranks, groups = {}, {}
    with graph.inserting_before(site.k_cat):
        for kind, heads in (("ret", ret), ("str", strm)):
            rk = group_rank(r_k, d, k_up.shape[1], len(heads), hk, D)
            kd, ku = _factor(ak_t.T @ k_up[:, _cols(heads, D)], rms, rk)
            q_idx = _query_heads(heads, g)
            nodes = {"k_down": _param(sg, f"{pre}_{kind}_k_down", kd), "k_up": _param(sg, f"{pre}_{kind}_k_up", ku)}
            if a.get("k_bias") is not None:
                kb = attr_tensor(gm, str(a["k_bias"].target))
                nodes["k_bias"] = _param(sg, f"{pre}_{kind}_k_bias", kb[_cols(heads, D)])
            if absorbed:
                rv = group_rank(r_v, d, hk * D, len(heads), hk, D)
                blocks = w_o_heads[:, q_idx]  # [hidden, Hq_g, r_v]
                m = av_t.T @ blocks.permute(2, 1, 0).reshape(r_v, -1)  # [d, Hq_g*hidden]
                vd, vu = _factor(m, rms, rv)
                groups[kind] = {"o_blocks": vu.view(rv, len(q_idx), hidden)}  # per query head [r_g, hidden]
            else:
                rv = group_rank(r_v, d, v_up.shape[1], len(heads), hk, dv)
                vd, vu = _factor(av_t.T @ v_up[:, _cols(heads, dv)], rms, rv)
                nodes["v_up"] = _param(sg, f"{pre}_{kind}_v_up", vu)
                if a.get("v_bias") is not None:
                    vb = attr_tensor(gm, str(a["v_bias"].target))
                    nodes["v_bias"] = _param(sg, f"{pre}_{kind}_v_bias", vb[_cols(heads, dv)])
            nodes["v_down"] = _param(sg, f"{pre}_{kind}_v_down", vd)
            nodes["q_idx"] = _index(sg, f"{pre}_{kind}_q", q_idx)
            nodes["lat_k"] = call(graph, aten.linear.default, x, nodes["k_down"])
            nodes["lat_v"] = call(graph, aten.linear.default, x, nodes["v_down"])
            groups.setdefault(kind, {}).update(nodes=nodes, heads=heads, r_k=rk, r_v=rv)
            ranks[kind] = {"r_k": rk, "r_v": rv}
        order = _query_heads(ret, g) + _query_heads(strm, g)
        inv = _index(sg, f"{pre}_order", sorted(range(len(order)), key=order.__getitem__))
    # retrieval: the layer's latent states, narrowed to the retrieval ranks
    gr, gs = groups["ret"], groups["str"]
    site.k_cat.replace_input_with(cat_parts(site.k_cat)[1], gr["nodes"]["lat_k"])
    site.v_cat.replace_input_with(cat_parts(site.v_cat)[1], gr["nodes"]["lat_v"])
    for name, r in ((site.k_name, gr["r_k"]), (site.v_name, gr["r_v"])):
        entry = ed.find(name)
        entry[0] = StateSpec(entry[0].name, entry[0].kind, (-1, 0, r), entry[0].dtype, seq_dim=1, layer=layer)
    spec = ed.find(site.k_name)[0]
    k_ph = ed.add(StateSpec(f"{STREAM_K}{layer}", "kv", (-1, 0, gs["r_k"]), spec.dtype, seq_dim=1, layer=layer))
    v_ph = ed.add(StateSpec(f"{STREAM_V}{layer}", "kv", (-1, 0, gs["r_v"]), spec.dtype, seq_dim=1, layer=layer))
    p_ph = ed.add(StateSpec(f"{STREAM_POS}{layer}", "positions", (-1, len(strm), 0), torch.long, seq_dim=2, layer=layer))
    width = max(gr["r_v"], gs["r_v"]) if absorbed else None
    with graph.inserting_before(attn):
        pos = positions_node(sg)
        c_k_str = call(graph, aten.cat.default, [k_ph, gs["nodes"]["lat_k"]], 1)
        c_v_str = call(graph, aten.cat.default, [v_ph, gs["nodes"]["lat_v"]], 1)
        per_head = call(graph, aten.expand.default, call(graph, aten.unsqueeze.default, pos, 1), [-1, len(strm), -1])
        kp_str = call(graph, aten.cat.default, [p_ph, per_head], 2)
        kp_str0 = call(graph, aten.select.int, kp_str, 1, 0)  # every streaming head keeps the same rows
        outs = []
        for kind, grp, c_k, c_v, kp in (("retrieval", gr, site.k_cat, site.v_cat, a["k_pos"]),
                                        ("streaming", gs, c_k_str, c_v_str, kp_str0)):
            n = grp["nodes"]
            values = {k: v for k, v in a.items() if k not in ("q", "c_k", "c_v", "k_up", "k_bias", "v_up", "v_bias", "k_pos")}
            sub = schema.call(graph, LATENT_ATTENTION, q=call(graph, aten.index_select.default, a["q"], 1, n["q_idx"]),
                              c_k=c_k, c_v=c_v, k_up=n["k_up"], k_bias=n.get("k_bias"), v_up=n.get("v_up"),
                              v_bias=n.get("v_bias"), k_pos=kp, **values)
            sub.meta.update({key: val for key, val in attn.meta.items() if key in ("nn_module_stack", "stack_trace")})
            sub.meta["graphwright"] = {**attn.meta.get("graphwright", {}), "variant": f"duo_{kind}",
                                       "kv_heads": grp["heads"]}
            if absorbed and grp["r_v"] < width:
                sub = call(graph, aten.constant_pad_nd.default, sub, [0, width - grp["r_v"]])
            outs.append(sub)
        out = call(graph, aten.index_select.default, call(graph, aten.cat.default, outs, 1), 1, inv)
    attn.replace_all_uses_with(out)
    graph.erase_node(attn)
    if absorbed:
        _refold_o(sg, layer, o_lin, chain, groups, ret, strm, g, width)
    with graph.inserting_after(out):
        both = call(graph, aten.cat.default, [c_k_str, c_v_str], -1)
    with graph.inserting_after(both):
        payload = call(graph, aten.unsqueeze.default, both, 1)
    with graph.inserting_after(payload):
        evict = schema.call(graph, STREAMING_POLICY.op, k=payload, v=payload, q_pos=a["q_pos"], k_pos=kp_str, **params)
    site.attn = outs[1]
    tag(evict, site, "kv_evict", "streaming")
    got = dict(zip(STREAMING_POLICY.outputs(), insert_outputs(graph, evict, len(STREAMING_POLICY.outputs()))))
    last = got["k_pos"]
    with graph.inserting_after(last):
        rows = call(graph, aten.select.int, got["v"], 1, 0)
    with graph.inserting_after(rows):
        ck = call(graph, aten.slice.Tensor, rows, -1, 0, gs["r_k"])
    with graph.inserting_after(ck):
        cv = call(graph, aten.slice.Tensor, rows, -1, gs["r_k"], 2 ** 62)
    for name, node in ((f"{STREAM_K}{layer}", ck), (f"{STREAM_V}{layer}", cv), (f"{STREAM_POS}{layer}", got["k_pos"])):
        ed.set_output(name, node)
    return ranks


def _refold_o(sg, layer, lin, chain, groups, ret, strm, g, width) -> None:
    """o_proj gets, per query head (model order), its group's new block [hidden, r_g] padded to ``width``."""
    from .duo import _query_heads

    info = sg.info
    w_old = attr_tensor(sg.gm, str(linear_parts(lin)[1].target))
    hidden = w_old.shape[0]
    w = torch.zeros(hidden, info.num_heads, width, dtype=torch.float64)
    for kind, heads in (("ret", ret), ("str", strm)):
        blocks = groups[kind]["o_blocks"]  # [r_g, Hq_g, hidden]
        for j, h in enumerate(_query_heads(heads, g)):
            w[:, h, :blocks.shape[0]] = blocks[:, j].T
    with sg.gm.graph.inserting_before(lin):
        node = _param(sg, f"gw_duo_l{layer}_o_absorbed", w.reshape(hidden, -1))
    args = list(lin.args)
    args[1] = node
    lin.args = tuple(args)
    for n in chain:  # head-merging reshapes: last dim H * width
        if n.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
            shape = list(n.args[1])
            if isinstance(shape[-1], int) and shape[-1] != -1:
                n.args = (n.args[0], shape[:-1] + [info.num_heads * width])


def drop_unused_factors(sg, layers) -> None:
    """Delete the LoRC parameters of re-factored layers that no graph node reads any more (their memory)."""
    used = {n.target for n in sg.gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(sg.gm.named_parameters()):
        if any(name.startswith(f"gw_lowrank_l{layer}_") for layer in layers) and name not in used:
            delattr(sg.gm, name)
