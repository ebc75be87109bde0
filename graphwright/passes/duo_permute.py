"""DuoAttention's head split without gathers: the layer's heads permuted in its weights, retrieval heads first.

``duo.split_layer`` splits a layer's query, key and value heads into a retrieval group and a streaming
group and puts the two attentions' outputs back in model head order. Written with ``index_select``
that is six Gathers per split layer (q, new k, new v, twice each) and a seventh on the output, every
step, on every runtime (ONNX Runtime: 7 of a split layer's ~40 decode nodes on SmolLM2-135M).

Technique (an exact reparametrisation, no approximation): heads are independent between the q/k/v
projections and o_proj (per-head reshapes, transposes and RoPE, whose cos/sin broadcast over heads),
so permuting the heads consistently -- rows of ``q_proj``/``k_proj``/``v_proj`` (and their biases) by
head blocks, the columns of ``o_proj`` by the same query-head blocks -- computes the same function.
``permute_layer`` orders each split layer's KV heads ``retrieval + streaming`` (query heads follow
their KV head), so each group is a contiguous block: the gathers become one ``split_with_sizes`` per tensor and
the output needs no re-ordering (the two attentions' outputs concatenated are in the new order, which
the permuted ``o_proj`` reads). The permuted weights are new parameters of the step graph (the
model's own are not touched); the captured ones no other node reads are dropped from the export.

Only where it is provably head-wise: each projection is an ``aten.linear`` of a parameter whose path to
the attention input is reshapes into ``[..., heads, head_dim]``, transposes and element-wise ops whose
other operands broadcast over the head dim, slices/concatenations/means along other dims (``_headwise``);
o_proj is reached from the attention through single-user transposes/reshapes. Anything else (fused QKV
Conv1D, a latent cache, another pass's op on the path) keeps the gathers (``duo.split_layer``).

Exact setting: the permutation itself (logits equal the unpermuted graph's within fp32 rounding: the
o_proj reduction runs over its inputs in another order). Invariant tested (``tests/passes/test_duo_permute.py``):
on tiny Llama and tiny Qwen2 (q/k/v biases) the permuted duo graph's logits equal the gathered one's
(1e-5) over a prompt and decode steps, no ``index_select`` is left in its split layers, and the oracle
tests of ``tests/passes/test_duo.py`` pass with it on.
"""

from __future__ import annotations

import torch

from ..ops.graph_match import cat_dim, cat_parts
from .match import aten_args, attr_tensor, linear_parts

aten = torch.ops.aten
ENABLED = True  # False: duo.split_layer gathers heads with index_select (A/B, tests)

_ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default, aten.to.dtype,
                aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.pow.Tensor_Scalar,
                aten.rsqrt.default, aten.mul.Scalar, aten.add.Scalar, aten.type_as.default, aten.to.dtype_layout}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _proj(target: torch.fx.Node):
    """The single ``aten.linear`` of a parameter above ``target`` (stopping at linears), else None."""
    found, seen, todo = set(), set(), [target]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is aten.linear.default:
            found.add(n)
            continue
        todo.extend(n.all_input_nodes)
    if len(found) != 1:
        return None
    (lin,) = found
    w = linear_parts(lin)[1]
    return lin if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None


def _shape(n):
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _dim(d, ndim):
    return d % ndim if isinstance(d, int) else None


def _broadcasts(n, hd: dict, src: int, ndim: int) -> bool:
    """Whether every operand of ``n`` off the path has size 1 at the head dim ``src`` (or does not reach it)."""
    for x in n.all_input_nodes:
        if x in hd:
            continue
        s = _shape(x)
        if s is None or (src - (ndim - len(s)) >= 0 and s[src - (ndim - len(s))] != 1):
            return False
    return True


def _next_hd(n, hd: dict, head_dim: int, heads: int):
    """The head dim of ``n``'s output given its on-path inputs' (``hd``), or None when ``n`` is not head-wise."""
    ins = [x for x in n.all_input_nodes if x in hd]
    shape = _shape(n)
    if n.op != "call_function" or shape is None:
        return None
    src, nd = hd[ins[0]], len(shape)
    if n.target in _RESHAPE:  # the split of the projection's features into [..., heads, head_dim]
        ok = src == -1 and nd >= 2 and shape[-1] == head_dim and shape[-2] == heads
        return nd - 2 if ok else None
    if src == -1 or any(hd[x] != src for x in ins):
        return None
    if n.target is aten.transpose.int:
        args = aten_args(n)
        a, b = _dim(args["dim0"], nd), _dim(args["dim1"], nd)
        return b if src == a else a if src == b else src
    if n.target in _ELEMENTWISE:
        return src if _broadcasts(n, hd, src, nd) else None
    if n.target is aten.slice.Tensor:
        return src if _dim(aten_args(n)["dim"], nd) != src else None
    if n.target is aten.cat.default:
        whole = all(isinstance(p, torch.fx.Node) and p in hd for p in cat_parts(n))
        return src if whole and _dim(cat_dim(n), nd) != src else None
    if n.target is aten.mean.dim:
        args = aten_args(n)
        return src if args["keepdim"] and src not in {_dim(d, len(_shape(ins[0]))) for d in args["dim"]} else None
    return None


def _headwise(lin, target, heads: int, head_dim: int) -> bool:
    """Whether every path from ``lin``'s output to ``target`` [B, heads, T, head_dim] treats heads independently
    (module docstring), tracking the head dim through reshapes and transposes."""
    anc, todo = set(), [target]
    while todo:
        n = todo.pop()
        if n in anc or n is lin:
            continue
        anc.add(n)
        todo.extend(n.all_input_nodes)
    hd = {lin: -1}  # lin's output is flat (heads * head_dim features): -1 = not split into heads yet
    for n in lin.graph.nodes:
        if n in anc and any(x in hd for x in n.all_input_nodes):
            got = _next_hd(n, hd, head_dim, heads)
            if got is None:
                return False
            hd[n] = got
    return hd.get(target) == 1 and len(_shape(target) or ()) == 4


def _o_proj(attn):
    """(o_proj linear, chain) from the attention output through single-user transposes/reshapes, else (None, [])."""
    from .duo_latent import _o_linear

    lin, chain = _o_linear(attn)
    if lin is None or not isinstance(linear_parts(lin)[1], torch.fx.Node) or linear_parts(lin)[1].op != "get_attr":
        return None, []
    return lin, chain


def _param(gm, name: str, t: torch.Tensor) -> torch.fx.Node:
    gm.register_parameter(name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
    return gm.graph.get_attr(name)


def permute_layer(sg, layer: int, q, k_new, v_new, attn, order_kv: list, g: int) -> bool:
    """Permute the layer's heads to ``order_kv`` (KV heads; query heads follow) in its weights when every
    projection is found and head-wise (module docstring); returns whether it did (nothing changed if not)."""
    if not ENABLED:
        return False
    info, gm = sg.info, sg.gm
    H, Hk = info.num_heads, info.num_kv_heads
    found = {}
    for name, node, heads in (("q", q, H), ("k", k_new, Hk), ("v", v_new, Hk)):
        lin = _proj(node)
        shape = _shape(node)
        if lin is None or shape is None or not _headwise(lin, node, heads, shape[-1]):
            return False
        found[name] = (lin, heads, shape[-1])
    o_lin, _ = _o_proj(attn)
    if o_lin is None or len({lin for lin, _, _ in found.values()}) != 3 or not _biases_are_parameters(found):
        return False
    kv = torch.tensor(order_kv)
    qo = torch.tensor([h for k in order_kv for h in range(k * g, (k + 1) * g)])
    graph = gm.graph
    for name, (lin, heads, D) in found.items():
        x, w, b = linear_parts(lin)
        idx = qo if name == "q" else kv
        wt = attr_tensor(gm, str(w.target))
        with graph.inserting_before(lin):
            args = [x, _param(gm, f"gw_duo_l{layer}_{name}_proj_weight", wt.view(heads, D, -1)[idx].reshape(wt.shape))]
            if b is not None:  # a parameter (_biases_are_parameters)
                bt = attr_tensor(gm, str(b.target))
                args.append(_param(gm, f"gw_duo_l{layer}_{name}_proj_bias", bt.view(heads, D)[idx].reshape(bt.shape)))
        lin.args, lin.kwargs = tuple(args), {}
    x, w, b = linear_parts(o_lin)
    wt = attr_tensor(gm, str(w.target))
    D = found["q"][2]
    with graph.inserting_before(o_lin):
        wo = _param(gm, f"gw_duo_l{layer}_o_proj_weight", wt.view(wt.shape[0], H, D)[:, qo].reshape(wt.shape))
    o_lin.args, o_lin.kwargs = ((x, wo) if b is None else (x, wo, b)), {}
    return True


def _biases_are_parameters(found: dict) -> bool:
    """Whether each found projection's bias (if any) is a parameter (``permute_layer`` permutes it)."""
    for lin, _, _ in found.values():
        b = linear_parts(lin)[2]
        if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
            return False
    return True
