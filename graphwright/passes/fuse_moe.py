"""``fuse_moe``: replace each MoE block's router nodes + experts loop with one ``graphwright.fused_moe``.

Paper summary. Tutel (arXiv 2206.03382) and vLLM's ``fused_moe`` make MoE inference fast by
not looping over experts in Python: route every token, sort the (token, slot) pairs by
expert, run the experts as grouped GEMMs over contiguous row blocks, and scatter the
weighted results back. With no capacity limit (Tutel's cf = 0, "never drop") this is
*exact*: it is the same sum y_t = sum_k w_tk FFN_{e_tk}(x_t) that transformers' loop
computes, only batched. The catch is the router: Mixtral, Qwen2-MoE and PhiMoE (GRIN's
SparseMixer) all route differently and in different dtypes, and a fused kernel that
"simplifies" routing flips near-ties. So the fused op carries the router *kind* and
recomputes routing with the model's own op sequence (``graphwright.ops.moe_routing``).

What the pass does, per ``graphwright.moe_experts`` node (one per MoE block):

1. walks back from the experts' ``top_k_index``/``top_k_weights`` to the router linear
   (``<block>.gate.weight`` or ``<block>.router.weight``), collecting the router's ATen
   nodes (softmax, topk, renormalise, casts; sparsemixer's max/threshold/mask/scatter...);
2. classifies the router (mixtral | qwen2_moe | sparsemixer, with k, jitter epsilon and
   norm_topk_prob read from the graph) and *proves* the classification: the collected
   subgraph and ``moe_routing.route`` are run on probe logits (random, near-ties within 2%
   of the max, negative maxima, zero scores with max <= 0) and must agree bit for bit;
3. replaces router + experts with one ``fused_moe`` node (outputs: block output, router
   logits), rewires any other user of the logits to the fused logits, erases the dead
   router nodes and tags the node ``variant="fused_moe"``. Shared experts (Qwen2-MoE) are
   ordinary graph nodes and stay as they are.

Exact: routing indices/weights bit-equal to transformers, outputs equal up to GEMM
batching round-off (fp32 1e-5), greedy tokens unchanged -- tested in
``tests/passes/test_fuse_moe.py`` on tiny Mixtral/PhiMoE/Qwen2-MoE and upcycled SmolLM2.
``impl``: "sorted" (torch grouped GEMMs, any device), "triton" (Triton kernels), "auto"
(Triton on a GPU, sorted elsewhere); the choice is stored in the node's meta and read by
``codegen.lower``.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass

import torch

from ..capture.ops import MOE_EXPERTS
from ..ops import schema
from ..ops.fused_moe import FUSED_MOE
from ..ops.moe_routing import route
from .base import Arg, Pass, PassContext, register_pass
from .match import linear_parts, scalar_operand, source

aten = torch.ops.aten
_LINEAR = aten.linear.default
# ops a router may consist of (between its linear and the experts node); anything else means
# "not a router we know", e.g. a graph that mixes the hidden state back in
_ROUTER_OPS = {
    aten.softmax.int, aten._softmax.default, aten.topk.default, aten.sum.dim_IntList, aten.div.Tensor,
    aten.div_.Tensor, aten.to.dtype, aten._to_copy.default, aten.max.dim, aten.abs.default, aten.clamp.Tensor,
    aten.clamp.default, aten.sub.Tensor, aten.gt.Scalar, aten.masked_fill.Scalar, aten.gather.default,
    aten.scatter.value, aten.concat.default, aten.cat.default, operator.getitem,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
_MODEL_ROUTERS = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "phimoe": "sparsemixer"}


@dataclass
class RouterMatch:
    experts: torch.fx.Node  # the graphwright.moe_experts node
    linear: torch.fx.Node  # logits = linear(hidden, weight[, bias])
    nodes: list  # router nodes after the linear, in graph order
    kind: str
    top_k: int
    jitter_eps: float
    norm_topk_prob: bool
    module: str  # router module path (for messages and notes)


def _base(node):
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        node = source(node)
    return node


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _router_slice(experts: torch.fx.Node):
    """(linear, router nodes) feeding ``experts``' index and weights, or a reason string."""
    seen, linears, stack = set(), [], [schema.get(experts, "top_k_index"), schema.get(experts, "top_k_weights")]
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is _LINEAR:
            linears.append(n)
            continue
        if n.op != "call_function" or n.target not in _ROUTER_OPS:
            what = n.target if n.op == "call_function" else f"{n.op} {n.target}"
            return f"top-k routing depends on {what} ({n.name}), which is not part of a known router"
        stack.extend(n.all_input_nodes)
    if len(linears) != 1:
        return f"expected one router linear feeding the top-k routing, found {len(linears)}"
    linear = linears[0]
    x, weight, bias = linear_parts(linear)
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return "the router linear's weight is not a parameter"
    if not isinstance(weight.target, str) or not weight.target.endswith((".gate.weight", ".router.weight")):
        return f"router weight {weight.target!r} is not <block>.gate.weight or <block>.router.weight"
    if bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
        return "the router linear's bias is not a parameter"
    if _base(x) is not _base(schema.get(experts, "hidden")):
        return "the router reads a different tensor than the experts"
    seen.discard(linear)
    order = {n: i for i, n in enumerate(experts.graph.nodes)}
    return linear, sorted(seen, key=order.__getitem__)


def _classify(sg, nodes, experts, linear):
    """(kind, top_k, jitter_eps, norm_topk_prob) read off the router's nodes, or a reason string."""
    targets = [n.target for n in nodes]
    idx_val = _val(schema.get(experts, "top_k_index"))
    if idx_val is None or not isinstance(idx_val.shape[-1], int):
        return "the top-k width is not a static integer"
    k = int(idx_val.shape[-1])
    if aten.max.dim in targets and aten.scatter.value in targets:
        gts = [n for n in nodes if n.target is aten.gt.Scalar]
        thresholds = [scalar_operand(n) for n in gts]
        if len(gts) != 2 or thresholds[0] != thresholds[1] or k != 2:
            return "sparsemixer-like router without two equal thresholds and top-2"
        return "sparsemixer", 2, float(thresholds[0]) / 2.0, False  # the graph holds 2 * eps (exact halving)
    if aten.topk.default in targets:
        topk = next(n for n in nodes if n.target is aten.topk.default)
        after = [n for n in nodes if n is not topk and topk in _ancestors(n)]
        norm = any(n.target is aten.sum.dim_IntList for n in after)
        cast = any(n.target in (aten.to.dtype, aten._to_copy.default) for n in after)
        kind = _MODEL_ROUTERS.get(sg.info.model_type)
        if kind not in ("mixtral", "qwen2_moe"):
            kind = "mixtral" if norm and not cast else "qwen2_moe"
        return kind, int(scalar_operand(topk)), 0.0, norm
    return "no topk or sparsemixer pattern after the router linear"


def _ancestors(node):
    out, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(n.all_input_nodes)
    return out


def _probe_logits(num_experts: int, dtype) -> torch.Tensor:
    """Router logits that stress every branch: random rows, near-ties within 2% of the max,
    negative maxima, exact ties, and zero scores with max <= 0 (sparsemixer's 0/0 = NaN case)."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(48, num_experts, generator=g) * 3]
    base = torch.randn(16, num_experts, generator=g)
    top = base.max(-1, keepdim=True).values
    near = base.clone()
    near[:, 1] = top[:, 0] * (1 - 0.015 * torch.rand(16, generator=g))
    rows += [near, -base.abs() - 0.1, torch.zeros(2, num_experts), base.round()]
    z = -torch.rand(8, num_experts, generator=g)
    z[:, 0] = 0.0
    z[:4, 1] = 0.0
    rows.append(z)
    return torch.cat(rows).to(dtype)


def _verify_routing(nodes, linear, experts, kind, k, eps, norm) -> str | None:
    """Run the graph's router nodes and ``moe_routing.route`` on probe logits: bit-equal or a reason."""
    g = torch.fx.Graph()
    env = {linear: g.placeholder("logits")}
    for n in nodes:
        missing = [a for a in n.all_input_nodes if a not in env]
        if missing:
            return f"router node {n.name} reads {missing[0].name}, which is outside the router"
        env[n] = g.node_copy(n, env.__getitem__)
    g.output((env[schema.get(experts, "top_k_weights")], env[schema.get(experts, "top_k_index")]))
    run = torch.fx.GraphModule(torch.nn.Module(), g)
    lv = _val(linear)
    logits = _probe_logits(int(lv.shape[-1]), lv.dtype)
    try:
        w_graph, i_graph = run(logits.clone())
        w_ours, i_ours = route(kind, logits.clone(), k, eps, norm)
    except Exception as exc:  # noqa: BLE001 - reported as "not recognised", with the error
        return f"router nodes could not be replayed ({type(exc).__name__}: {exc})"
    if not (torch.equal(i_graph, i_ours) and w_graph.dtype == w_ours.dtype and torch.equal(w_graph, w_ours)):
        return f"router behaves differently from the {kind} router on probe logits"
    return None


def match_router(sg, experts: torch.fx.Node) -> RouterMatch | str:
    """The router of one MoE block, classified and verified; or why it was not recognised."""
    found = _router_slice(experts)
    if isinstance(found, str):
        return found
    linear, nodes = found
    cls = _classify(sg, nodes, experts, linear)
    if isinstance(cls, str):
        return cls
    kind, k, eps, norm = cls
    why = _verify_routing(nodes, linear, experts, kind, k, eps, norm)
    if why:
        return why
    module = linear_parts(linear)[1].target.rsplit(".", 1)[0]
    module = module[3:] if module.startswith("hf.") else module
    return RouterMatch(experts, linear, nodes, kind, k, eps, norm, module)


def _block_name(node) -> str:
    meta = node.meta.get("graphwright", {})
    return meta.get("module") or node.name


@register_pass
class FuseMoE(Pass):
    name = "fuse_moe"
    model_level = True
    needs = frozenset({"moe_experts"})
    produces = frozenset({"fused_moe"})
    removes = frozenset({"moe_experts"})
    stage = 10
    examples = {"exact": "fuse_moe", "lossy": None, "models": ("tiny-mixtral", "tiny-qwen2moe")}
    exact = True
    args = (Arg("impl", str, "auto", "fused MoE implementation: sorted (torch grouped GEMMs), triton, or auto",
                choices=("auto", "sorted", "triton")),)
    doc = "Fuse each MoE block's router and experts loop into one expert-sorted grouped-GEMM op (exact)."

    def applies_to(self, sg) -> str | None:
        blocks = sg.nodes(MOE_EXPERTS)
        if not blocks:
            if sg.nodes(FUSED_MOE):
                return "its MoE blocks are already fused"
            return f"the model has no MoE blocks (dense architecture {sg.info.architecture})"
        for node in blocks:
            found = match_router(sg, node)
            if isinstance(found, str):
                return f"router pattern of {_block_name(node).rsplit('.experts', 1)[0]} not recognised: {found}"
        return None

    def run(self, sg, ctx: PassContext):
        if self.impl == "triton":
            _check_triton(sg)
        graph = sg.gm.graph
        per_layer = {}
        for experts in sg.nodes(MOE_EXPERTS):
            m = match_router(sg, experts)
            if isinstance(m, str):  # applies_to said yes, so this is a bug, not a user error
                raise RuntimeError(f"fuse_moe: {_block_name(experts)}: {m}")
            hidden, gate_up, down, act = (schema.get(experts, name) for name in ("hidden", "gate_up_proj", "down_proj", "act"))
            _, weight, bias = linear_parts(m.linear)
            with graph.inserting_before(experts):
                fused = graph.call_function(FUSED_MOE, (hidden, weight, bias, gate_up, down, m.kind, m.top_k, act,
                                                         m.jitter_eps, m.norm_topk_prob))
                out = graph.call_function(operator.getitem, (fused, 0))
                logits = graph.call_function(operator.getitem, (fused, 1))
            old = experts.meta.get("graphwright", {})
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in experts.meta:
                    fused.meta[key] = experts.meta[key]
            fused.meta["val"] = (experts.meta.get("val"), m.linear.meta.get("val"))
            out.meta["val"], logits.meta["val"] = fused.meta["val"]
            layer = old.get("layer")
            fused.meta["graphwright"] = {"op": "fused_moe", "layer": layer, "module": m.module.rsplit(".", 1)[0],
                                         "variant": "fused_moe", "router": m.kind, "impl": self.impl}
            experts.replace_all_uses_with(out)
            owned = set(m.nodes)
            m.linear.replace_all_uses_with(logits, delete_user_cb=lambda u, owned=owned: u not in owned)
            graph.erase_node(experts)
            # router nodes whose values are still read elsewhere (e.g. top-k weights kept for an
            # aux loss) stay; the rest are erased, users first. Explicit erasure rather than
            # eliminate_dead_code: the router's in-place div_ counts as impure there.
            for n in reversed([m.linear, *m.nodes]):
                if not n.users:
                    graph.erase_node(n)
            per_layer[layer] = {"router": m.kind, "experts": int(gate_up.meta["val"].shape[0]), "top_k": m.top_k}
        graph.lint()
        sg.gm.recompile()
        sg.notes["fuse_moe"] = {"per_layer": per_layer, "counts": {"fused": len(per_layer)},
                                "settings": {"impl": self.impl}}
        return sg


def _check_triton(sg) -> None:
    """``impl="triton"`` needs a CUDA model and an importable Triton: refuse at compile time, before any kernel runs."""
    from ..errors import RecipeError

    device = next((t.device for t in sg.gm.parameters()), None) or next((t.device for t in sg.gm.buffers()), torch.device("cpu"))
    allowed = "impl='sorted' (any device) or impl='auto' (Triton on a GPU, sorted elsewhere)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter runs them on CPU (tests only)
        raise RecipeError(f"fuse_moe: impl='triton' runs Triton GPU kernels and this model is on {device}; "
                          f"move the model to a CUDA GPU or use {allowed} (or set TRITON_INTERPRET=1, tests only)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise RecipeError(f"fuse_moe: impl='triton' needs the triton package, which is not installed; use {allowed}") from None
