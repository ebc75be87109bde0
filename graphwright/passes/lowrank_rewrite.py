"""Graph surgery for ``lowrank_kv``: find a layer's K/V/O projections and swap in the latent path.

Per layer the captured graph has::

    x -> linear(W_K, b_K) -> view/transpose -> RoPE -> k_new;  k_all = cat([k_cache, k_new], 2)
    x -> linear(W_V, b_V) -> view/transpose ->         v_new;  v_all = cat([v_cache, v_new], 2)
    attention(q, k_all, v_all, q_pos, k_pos, scale, window) -> transpose -> reshape -> linear(W_O)

(or one fused ``qkv_proj`` linear sliced into q/k/v, Phi-3; or GPT-2's fused Conv1D ``c_attn``,
captured as ``addmm(b, x2d, W[d, 3d])`` and split into q/k/v, with no RoPE on the key path).
The rewrite adds::

    c_k_all = cat([c_k_cache, linear(x, A_K^T)], 1)          # [B, S, r_k]
    c_v_all = cat([c_v_cache, linear(x, A_V^T)], 1)          # [B, S, r_v]
    latent_attention(q, c_k_all, c_v_all, B_K, b_K, B_V|None, b_V|None, q_pos, k_pos, inv_freq, ...)

and, in absorbed mode, gives the o_proj linear the folded weight [hidden, H*r_v] (and bias).
The old K/V paths become dead and are removed by dead-code elimination.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..capture.step_graph import StateSpec
from ..ops import schema
from ..ops.latent_attention import LATENT_ATTENTION
from .match import (KeyNorm, LayerSite, NoMatch, RopeInfo, addmm_parts, attr_tensor, key_norm, layer_site, linear_parts,
                    rotary_table, source)

__all__ = ["KeyNorm", "LayerSite", "Projections", "RopeInfo", "kv_projections", "lowrank_site", "rewrite_layer",
           "set_fake_vals", "shrink_fused_qkv"]

aten = torch.ops.aten
_PREFIX = "hf."
_NUM_FIXED_INPUTS = 3  # input_ids, positions, logits_index precede the state placeholders
_PASS_THROUGH = {aten.transpose.int, aten.reshape.default, aten.view.default, aten.clone.default,
                 aten.contiguous.default, aten._unsafe_view.default}
# what may sit between a key projection and the cache cat when the model has no rotary table
_KEY_PATH_OK = _PASS_THROUGH | {aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor,
                                aten.alias.default, aten.permute.default, operator.getitem}


@dataclass
class Projections:
    """What ``lowrank_kv`` needs of a layer beyond its ``LayerSite``: the K/V/O projections and key path."""

    x: torch.fx.Node  # input of the K/V projections
    w_k: torch.Tensor  # [H_kv*D, d] (torch Linear layout)
    b_k: torch.Tensor | None
    w_v: torch.Tensor
    b_v: torch.Tensor | None
    o_linear: torch.fx.Node | None  # the o_proj linear fed by this attention (absorbed mode)
    qkv_linear: torch.fx.Node | None  # fused projection (Phi-3 linear, GPT-2 addmm), shrunk to its q rows afterwards
    q_rows: int
    conv1d: bool = False  # qkv_linear is GPT-2's addmm(b, x2d, W[in, out]) rather than linear(x, W[out, in])
    rope: RopeInfo | None = None  # this layer's rotary table (Gemma-3: local or global); None: unrotated keys
    k_norm: KeyNorm | None = None  # per-head RMSNorm on the keys before RoPE (Qwen3, Gemma-3)


_attr = attr_tensor


def _weight_user(gm, target: str, op, weight_of):
    """The first ``op`` node whose weight (``weight_of(node)``) is the parameter ``target``, or None."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            for u in n.users:
                if u.target is op and weight_of(u) is n:
                    return u
    return None


def _linear_of(gm, target: str):
    return _weight_user(gm, target, aten.linear.default, lambda u: linear_parts(u)[1])


def _addmm_of(gm, target: str):
    """GPT-2's Conv1D: addmm(bias, x2d, weight[in, out])."""
    return _weight_user(gm, target, aten.addmm.default, lambda u: addmm_parts(u)[2])


def _bias(gm, lin) -> torch.Tensor | None:
    b = linear_parts(lin)[2]
    return None if b is None else _attr(gm, str(b.target))


def _o_linear(attn):
    """Follow attention -> transpose -> reshape ... -> linear (single-user chain)."""
    n = attn
    for _ in range(6):
        if len(n.users) != 1:
            return None
        (u,) = n.users
        if (u.target is aten.linear.default and linear_parts(u)[0] is n) or (
                u.target is aten.addmm.default and addmm_parts(u)[1] is n):
            return u
        if u.target not in _PASS_THROUGH:
            return None
        n = u
    return None


def _unrotated_key_path(new_k, proj, why: str) -> str | None:
    """Without a rotary table, the keys must reach the cache from ``proj`` through reshapes only."""
    n = new_k
    while n is not proj:
        if not isinstance(n, torch.fx.Node) or n.op != "call_function" or n.target not in _KEY_PATH_OK:
            what = n.target if isinstance(n, torch.fx.Node) else n
            return (f"keys are transformed by {what} between the projection and the cache and the layer has no "
                    f"rotary table ({why}): lowrank_kv supports RoPE or unrotated keys only")
        n = source(n)
    return None


def lowrank_site(sg, attn) -> LayerSite | NoMatch:
    """``match.layer_site`` of a dense attention node with its ``kv_projections`` in ``site.proj``, or why
    the layer cannot be rewritten."""
    meta = attn.meta.get("graphwright") or {}
    where = f"layer {meta.get('layer')} ({meta.get('module', '')})"
    if schema.get(attn, "key_bias") is not None:
        return NoMatch(f"{where}: attention carries a key_bias (steering); apply lowrank_kv before steer, "
                       "latent attention has no key_bias input")
    site = layer_site(sg, attn)
    if not site:
        return NoMatch(f"{where}: keys/values are not cat([cache, new], dim=2) of a dense cache input ({site.reason})")
    if site.latent:
        return NoMatch(f"{where}: the layer already has low-rank (latent) attention; lowrank_kv applies once")
    proj = kv_projections(sg, site)
    if not proj:
        return proj
    site.proj = proj
    return site


def _fused_c_attn(gm, c_attn, H, D, Hk, where):
    """GPT-2: Conv1D weight [d, 3*H*D] (in x out), columns q | k | v -> (x, w_k, b_k, w_v, b_v) or NoMatch."""
    b_node, x2d, w_node = addmm_parts(c_attn)
    x = source(x2d) if x2d.target in (aten.view.default, aten.reshape.default) else None
    val = getattr(x, "meta", {}).get("val")
    if val is None or val.dim() != 3:
        return NoMatch(f"{where}: c_attn input is not a [B, T, d] hidden state flattened by a view")
    w = _attr(gm, str(w_node.target)).T
    b = _attr(gm, str(b_node.target))
    q_rows, kv_rows = H * D, Hk * D
    if w.shape[0] != q_rows + 2 * kv_rows:
        return NoMatch(f"{where}: c_attn has {w.shape[0]} output columns, expected {q_rows + 2 * kv_rows}")
    return x, w[q_rows:q_rows + kv_rows], b[q_rows:q_rows + kv_rows], w[q_rows + kv_rows:], b[q_rows + kv_rows:]


def _fused_qkv(gm, qkv, H, D, Hk, where):
    """Phi-3: one qkv_proj Linear, rows q | k | v -> (x, w_k, b_k, w_v, b_v) or NoMatch."""
    x, w_node, _ = linear_parts(qkv)
    w, b = _attr(gm, str(w_node.target)), _bias(gm, qkv)
    q_rows, kv_rows = H * D, Hk * D
    if w.shape[0] != q_rows + 2 * kv_rows:
        return NoMatch(f"{where}: qkv_proj has {w.shape[0]} rows, expected {q_rows + 2 * kv_rows}")
    b_k, b_v = (None, None) if b is None else (b[q_rows:q_rows + kv_rows], b[q_rows + kv_rows:])
    return x, w[q_rows:q_rows + kv_rows], b_k, w[q_rows + kv_rows:], b_v


def kv_projections(sg, site: LayerSite) -> Projections | NoMatch:
    """The K/V projections, o_proj linear, rotary table and key norm of a dense layer, or why not.

    The layer's own rotary table (``match.rotary_table``) and key norm (``match.key_norm``) are
    read from its key path, so models with several tables (Gemma-3) rewrite every layer.
    """
    gm, info, attn = sg.gm, sg.info, site.attn
    where = f"layer {site.layer} ({site.module})"
    H, D, Hk = info.num_heads, info.head_dim, info.num_kv_heads
    prefix = _PREFIX + site.module
    lk, lv = _linear_of(gm, prefix + ".k_proj.weight"), _linear_of(gm, prefix + ".v_proj.weight")
    qkv, q_rows, conv1d = None, 0, False
    c_attn = _addmm_of(gm, prefix + ".c_attn.weight")
    if c_attn is not None:
        qkv, conv1d, q_rows, found = c_attn, True, H * D, _fused_c_attn(gm, c_attn, H, D, Hk, where)
    elif lk is not None and lv is not None:
        (x, wk_node, _), (xv, wv_node, _) = linear_parts(lk), linear_parts(lv)
        if x is not xv:
            return NoMatch(f"{where}: k_proj and v_proj read different inputs")
        found = x, _attr(gm, str(wk_node.target)), _bias(gm, lk), _attr(gm, str(wv_node.target)), _bias(gm, lv)
    else:
        qkv = _linear_of(gm, prefix + ".qkv_proj.weight")
        if qkv is None:
            return NoMatch(f"{where} has no k_proj/v_proj, fused qkv_proj Linear or GPT-2 Conv1D c_attn")
        q_rows, found = H * D, _fused_qkv(gm, qkv, H, D, Hk, where)
    if not found:
        return found
    x, w_k, b_k, w_v, b_v = found
    if w_k.shape[0] != Hk * D or w_v.shape[0] % Hk:
        return NoMatch(f"{where}: k/v projection widths {w_k.shape[0]}/{w_v.shape[0]} do not match {Hk} KV heads x {D}")
    rope = rotary_table(sg, attn)
    if isinstance(rope, NoMatch):
        reason = _unrotated_key_path(site.k_new, qkv if qkv is not None else lk, rope.reason)
        if reason:
            return NoMatch(f"{where}: {reason}")
        rope = None
    norm = key_norm(sg, attn)
    if isinstance(norm, NoMatch):
        return NoMatch(f"{where}: {norm.reason}; lowrank_kv would drop it")
    if norm is not None and not schema.has_arg(LATENT_ATTENTION, "k_norm"):
        return NoMatch(f"{where}: keys pass through a per-head RMSNorm ({norm.target}) before RoPE and "
                       "graphwright.latent_attention has no k_norm input; rebuilding keys without it would change them")
    if schema.get(attn, "sinks", 0) and not schema.has_arg(LATENT_ATTENTION, "sinks"):
        return NoMatch(f"{where}: attention has sinks and graphwright.latent_attention has no sinks input")
    return Projections(x=x, w_k=w_k, b_k=b_k, w_v=w_v, b_v=b_v, o_linear=_o_linear(attn), qkv_linear=qkv,
                       q_rows=q_rows, conv1d=conv1d, rope=rope, k_norm=norm)


def _param(gm, name: str, t: torch.Tensor, dtype) -> str:
    gm.register_parameter(name, torch.nn.Parameter(t.to(dtype).contiguous(), requires_grad=False))
    return name


def _absorbed_o(w_o: torch.Tensor, b_o, up_v: torch.Tensor, b_v, num_heads: int, num_kv_heads: int):
    """W_O'[:, h-block] = W_O[:, h-block] @ B_V[:, kv(h)-block]^T; b_O' = b_O + W_O @ repeat(b_V). fp64."""
    hidden = w_o.shape[0]
    g = num_heads // num_kv_heads
    dv = up_v.shape[1] // num_kv_heads
    wo = w_o.double().view(hidden, num_kv_heads, g, dv)  # query head h = kv * g + j (repeat_kv order)
    bv = up_v.double().view(-1, num_kv_heads, dv)  # [r_v, Hk, Dv]
    w_new = torch.einsum("okgd,rkd->okgr", wo, bv).reshape(hidden, -1)
    b_new = None if b_o is None else b_o.double()
    if b_v is not None:
        bv_rep = b_v.double().view(num_kv_heads, 1, dv).expand(num_kv_heads, g, dv).reshape(-1)
        b_new = (0 if b_new is None else b_new) + w_o.double() @ bv_rep
    return w_new, b_new


def _copy_meta(dst, src):
    for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def rewrite_layer(sg, site: LayerSite, svd_k, svd_v, r_k: int, r_v: int, absorbed: bool) -> None:
    """Replace one layer's dense K/V cache and attention by the latent path (see module docstring)."""
    gm, info, graph = sg.gm, sg.info, sg.gm.graph
    dtype, l, attn = info.dtype, site.layer, site.attn
    (uk, sk, vhk), (uv, sv, vhv) = svd_k, svd_v
    down_k = (uk[:, :r_k] * sk[:r_k]).T  # A_K^T [r_k, d]: singular values on the down side
    down_v = (uv[:, :r_v] * sv[:r_v]).T
    up_k, up_v = vhk[:r_k], vhv[:r_v]  # B [r, H_kv*D]
    names = {
        "k_down": _param(gm, f"gw_lowrank_l{l}_k_down", down_k, dtype),
        "v_down": _param(gm, f"gw_lowrank_l{l}_v_down", down_v, dtype),
        "k_up": _param(gm, f"gw_lowrank_l{l}_k_up", up_k, dtype),
    }
    if site.proj.b_k is not None:
        names["k_bias"] = _param(gm, f"gw_lowrank_l{l}_k_bias", site.proj.b_k, dtype)
    # B_V (and b_V) are parameters in both value paths; absorbed, no node reads them but eviction scorers that
    # need per-head value norms from the latent rows (expected_attention, ``passes/evict.py``) do
    v_names = {"v_up": _param(gm, f"gw_lowrank_l{l}_v_up", up_v, dtype)}
    if site.proj.b_v is not None:
        v_names["v_bias"] = _param(gm, f"gw_lowrank_l{l}_v_bias", site.proj.b_v, dtype)
    if not absorbed:
        names.update(v_names)
    if site.proj.k_norm is not None:
        # fp32 like the models compute it (Gemma: 1 + weight.float()); the op normalises in fp32
        names["k_norm"] = _param(gm, f"gw_lowrank_l{l}_k_norm", site.proj.k_norm.weight, torch.float32)
    rope, a = site.proj.rope, schema.bound(attn)
    extra = {"window": a["window"]}  # a sliding layer stays sliding
    if a.get("sinks"):
        extra["sinks"] = a["sinks"]
    with graph.inserting_before(attn):
        get = {k: graph.get_attr(v) for k, v in names.items()}
        lat_k = graph.call_function(aten.linear.default, (site.proj.x, get["k_down"]))
        lat_v = graph.call_function(aten.linear.default, (site.proj.x, get["v_down"]))
        c_k = graph.call_function(aten.cat.default, ([site.k_cache, lat_k], 1))  # [B, S, r_k]
        c_v = graph.call_function(aten.cat.default, ([site.v_cache, lat_v], 1))  # [B, S, r_v]
        if site.proj.k_norm is not None:
            extra.update(k_norm=get["k_norm"], k_norm_eps=site.proj.k_norm.eps)
        new = schema.call(graph, LATENT_ATTENTION, q=a["q"], c_k=c_k, c_v=c_v, k_up=get["k_up"], k_bias=get.get("k_bias"),
                          v_up=get.get("v_up"), v_bias=get.get("v_bias"), q_pos=a["q_pos"], k_pos=a["k_pos"],
                          inv_freq=None if rope is None else rope.node, rope_scaling=1.0 if rope is None else rope.scaling,
                          scale=a["scale"], **extra)
    for n in (lat_k, lat_v, c_k, c_v, *get.values()):
        _copy_meta(n, site.k_cat)
    _copy_meta(new, attn)
    new.meta["graphwright"] = {**(attn.meta.get("graphwright") or {}), "variant": "lowrank", "value_up": v_names}
    attn.replace_all_uses_with(new)
    graph.erase_node(attn)
    site.touched = [*get.values(), lat_k, lat_v, c_k, c_v, new]
    site.k_cat.replace_all_uses_with(c_k)
    site.v_cat.replace_all_uses_with(c_v)
    if absorbed:
        _absorb_into_o(sg, site, new, up_v)
    _update_state(sg, site, r_k, r_v)


def _absorb_into_o(sg, site, new_attn, up_v) -> None:
    gm, info, graph = sg.gm, sg.info, sg.gm.graph
    lin = _o_linear(new_attn)
    if lin is None:
        raise RuntimeError(f"layer {site.layer}: attention output does not feed an o_proj linear through reshapes; "
                           "use value_path='reconstruct'")
    conv1d = lin.target is aten.addmm.default  # GPT-2 c_proj: addmm(b, x2d, W[in, out])
    if conv1d:
        w_o, b_o = _attr(gm, str(lin.args[2].target)).T, _attr(gm, str(lin.args[0].target))
    else:
        w_o, b_o = _attr(gm, str(lin.args[1].target)), _bias(gm, lin)
    w_new, b_new = _absorbed_o(w_o, b_o, up_v, site.proj.b_v, info.num_heads, info.num_kv_heads)
    l = site.layer
    with graph.inserting_before(lin):
        w_node = graph.get_attr(_param(gm, f"gw_lowrank_l{l}_o_absorbed", w_new.T if conv1d else w_new, info.dtype))
        b_node = None if b_new is None else graph.get_attr(_param(gm, f"gw_lowrank_l{l}_o_bias", b_new, info.dtype))
    if conv1d:
        lin.args = (b_node, lin.args[1], w_node)
        inp = lin.args[1]
    else:
        lin.args = (lin.args[0], w_node) + ((b_node,) if b_node is not None else ())
        inp = lin.args[0]
    site.touched += [w_node, lin] + ([b_node] if b_node is not None else [])
    # the head-merging reshapes must not hard-code H*D: their last dim becomes the new width H*r_v
    width = info.num_heads * up_v.shape[0]
    n = inp
    while n is not new_attn:
        site.touched.append(n)
        if n.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
            shape = list(n.args[1])
            if isinstance(shape[-1], int) and shape[-1] != -1:
                n.args = (n.args[0], shape[:-1] + [width])
        n = n.args[0]


def _update_state(sg, site, r_k: int, r_v: int) -> None:
    placeholders = [n for n in sg.gm.graph.nodes if n.op == "placeholder"]
    for ph, r, kind in ((site.k_cache, r_k, "k"), (site.v_cache, r_v, "v")):
        i = placeholders.index(ph) - _NUM_FIXED_INPUTS
        old = sg.state[i]
        sg.state[i] = StateSpec(f"{kind}{site.layer}_latent", "kv", (-1, 0, r), old.dtype, seq_dim=1, layer=site.layer)
        val = ph.meta.get("val")
        if val is not None:  # keep export's symbolic batch / cache-length sizes
            from torch._guards import detect_fake_mode

            mode = detect_fake_mode([val])
            with mode:
                ph.meta["val"] = torch.empty((val.shape[0], val.shape[2], r), dtype=val.dtype)


def shrink_fused_qkv(sg, site: LayerSite) -> None:
    """After DCE, a fused qkv_proj whose k/v slices died computes only its q rows."""
    lin = site.proj.qkv_linear
    if lin is None or not lin.users:
        return
    if site.proj.conv1d:
        _shrink_c_attn(sg, site)
        return
    for u in lin.users:
        if u.target is not aten.slice.Tensor or u.args[1] not in (-1, 2) or u.args[3] > site.proj.q_rows:
            return
    gm, dtype = sg.gm, sg.info.dtype
    w, b = _attr(gm, str(lin.args[1].target)), _bias(gm, lin)
    with gm.graph.inserting_before(lin):
        w_node = gm.graph.get_attr(_param(gm, f"gw_lowrank_l{site.layer}_q_proj", w[:site.proj.q_rows], dtype))
        b_node = None if b is None else gm.graph.get_attr(_param(gm, f"gw_lowrank_l{site.layer}_q_bias", b[:site.proj.q_rows], dtype))
    lin.args = (lin.args[0], w_node) + ((b_node,) if b_node is not None else ())
    site.touched += [w_node, lin] + ([b_node] if b_node is not None else [])


def _shrink_c_attn(sg, site: LayerSite) -> None:
    """GPT-2: addmm -> view[..., 3d] -> split(d, 2) whose only live chunk is q: keep W[:, :d]."""
    lin, d = site.proj.qkv_linear, site.proj.q_rows
    (view,) = lin.users if len(lin.users) == 1 else (None,)
    if view is None or view.target is not aten.view.default or len(view.users) != 1:
        return
    (split,) = view.users
    if split.target is not aten.split.Tensor or split.args[1] != d or split.args[2] not in (-1, 2):
        return
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in split.users):
        return
    gm, dtype = sg.gm, sg.info.dtype
    w, b = _attr(gm, str(lin.args[2].target)), _attr(gm, str(lin.args[0].target))
    with gm.graph.inserting_before(lin):
        w_node = gm.graph.get_attr(_param(gm, f"gw_lowrank_l{site.layer}_q_proj", w[:, :d], dtype))
        b_node = gm.graph.get_attr(_param(gm, f"gw_lowrank_l{site.layer}_q_bias", b[:d], dtype))
    lin.args = (b_node, lin.args[1], w_node)
    view.args = (view.args[0], list(view.args[1][:-1]) + [d])
    site.touched += [w_node, b_node, lin, view, split, *split.users]


def set_fake_vals(gm, nodes) -> None:
    """Fill ``meta['val']`` of ``nodes`` (in graph order) by running them on export's fake tensors.

    Local on purpose: re-propagating the whole graph with FakeTensorProp costs ~20 s for a
    30-layer model, while only the nodes the rewrite added or re-shaped need new values.
    """
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if v is not None])
    if mode is None:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def val(a):
        if isinstance(a, torch.fx.Node):
            return a.meta.get("val")
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        return a

    with mode:
        for n in sorted(nodes, key=order.__getitem__):
            if n.op == "get_attr":
                n.meta["val"] = mode.from_tensor(_attr(gm, str(n.target)), static_shapes=True)
            elif n.op == "call_function":
                try:
                    n.meta["val"] = n.target(*val(n.args), **val(n.kwargs))
                except Exception:  # noqa: BLE001 - shapes are informational; never fail the rewrite
                    n.meta.pop("val", None)
