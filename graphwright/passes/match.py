"""Graph matchers shared by passes: each returns what it found, or ``NoMatch(reason)``.

Modelled on the onnxscript rewriter's ``check -> MatchResult.fail(reason)``: a matcher never
raises on a graph it does not recognise; it returns a falsy ``NoMatch`` whose ``reason`` says what
was missing, so a pass can put the reason in its ``applies_to`` answer or ``sg.notes``.

``rotary_table(sg, attn)``: the rotary (RoPE) table of *that attention node's layer*. Models may
have several (Gemma-3: a local table for sliding layers and a global one; in torch.export graphs
they are different ``get_attr`` targets, e.g. ``rotary_emb.sliding_attention_inv_freq``). The
matcher follows the layer's key path backwards from the key-cache ``cat`` through the RoPE
multiply to the ``cos`` that comes from an ``inv_freq`` buffer, never crossing a projection
(linear / addmm / matmul), a placeholder or a parameter, so it cannot wander into another layer.
A ``graphwright.latent_attention`` node carries its table as an argument and is read directly.

``layer_site(sg, attn)``: the one layer-site matcher. A dense (``graphwright.attention``) or latent
(``graphwright.latent_attention``) node whose keys and values are ``cat([cache, new], dim)`` of
``kv`` state inputs (``ops/graph_match.cache_concat``) gives a ``LayerSite`` with the layer, module,
attention node, cache cats, placeholders and state names; eviction passes and ``lowrank_kv`` (which
adds its projection facts with ``lowrank_rewrite.kv_projections``) both start from it.

Aten-op argument helpers (``source``, ``linear_parts``, ``addmm_parts``, and ``cat_parts`` /
``cat_dim`` from ``ops/graph_match``) are where passes read aten nodes' arguments by position;
attention nodes are read by name only (``ops/schema.py``; ``tests/test_schema_only.py``).

Invariant tested (``tests/passes/test_match.py``): tiny-gemma3's sliding and global layers get
different tables with the right widths and bases; Llama gets the one table for both layers;
GPT-2 (no RoPE) gets ``NoMatch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..capture.ops import ATTENTION
from ..ops import schema
from ..ops.graph_match import CacheConcat, NoMatch, cache_concat, cat_dim, cat_parts, is_cat, is_match
from ..ops.latent_attention import LATENT_ATTENTION

__all__ = ["CacheConcat", "KeyNorm", "LayerSite", "NoMatch", "RopeInfo", "addmm_parts", "attr_tensor", "cache_concat",
           "cat_dim", "cat_parts", "is_cat", "is_match", "key_norm", "layer_site", "linear_parts", "new_keys",
           "rotary_table", "scalar_operand", "source"]

aten = torch.ops.aten
# the key path is never followed through these: beyond them lies the hidden state (another layer)
_STOP = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
         aten.embedding.default}
_MAX_NODES = 256


@dataclass
class RopeInfo:
    node: torch.fx.Node  # get_attr of inv_freq
    scaling: float  # transformers' attention_scaling (the constant multiplying cos and sin)
    inv_freq_shape: int  # number of frequencies (rotated dims / 2)


def source(node):
    """The first input of a unary aten op (view, reshape, transpose, cast, slice, getitem...)."""
    return node.args[0]


def scalar_operand(node):
    """The second argument of a binary aten op with a scalar (``gt.Scalar(x, 0.5)``, ``topk(x, k)``)."""
    return node.args[1]


def linear_parts(node) -> tuple:
    """``aten.linear(x, weight, bias=None)`` -> (x, weight node, bias node or None)."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias


def aten_args(node) -> dict:
    """Every argument of an aten op node by its schema name, defaults filled (``{"input", "dim0", "dim1"}`` of a
    transpose, ``{"input", "dim", "keepdim", "dtype"}`` of ``mean.dim``): torch.fx's ``normalize_function``."""
    from torch.fx.operator_schemas import normalize_function

    return normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True).kwargs


def addmm_parts(node) -> tuple:
    """GPT-2's Conv1D ``aten.addmm(bias, x2d, weight[in, out])`` -> (bias, x2d, weight)."""
    return node.args[0], node.args[1], node.args[2]


def attr_tensor(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.Tensor) else obj


def _gm(sg):
    return getattr(sg, "gm", sg)


def _is_inv_freq(n) -> bool:
    return n.op == "get_attr" and str(n.target).endswith("inv_freq")


def _backward(start, stop_at=None):
    """Nodes reachable backwards from ``start`` without crossing projections, placeholders or params."""
    seen, frontier = [], [start]
    while frontier and len(seen) < _MAX_NODES:
        n = frontier.pop(0)
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.append(n)
        if n.op != "call_function" or n.target in _STOP or (stop_at is not None and stop_at(n)):
            continue
        frontier.extend(n.all_input_nodes)
    return seen


def _scaling(cos) -> float:
    """transformers: cos = cos(cat(p * inv_freq, p * inv_freq)) * attention_scaling."""
    for m in cos.users:
        consts = [a for a in m.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if m.target is aten.mul.Tensor and consts:
            return float(consts[0])
    return 1.0


def new_keys(attn) -> torch.fx.Node | NoMatch:
    """The keys this step appends: ``k_new`` of ``k_all = cat([k_cache, k_new], 2)``."""
    m = cache_concat(schema.get(attn, "k"))
    if not m:
        return NoMatch(f"{attn.name}: keys are not cat([cache, new], 2) ({m.reason})")
    return m.new


def rotary_table(sg, attn) -> RopeInfo | NoMatch:
    """The inv_freq table, attention_scaling and width rotating ``attn``'s keys (see module doc)."""
    gm = _gm(sg)
    layer = schema.layer_of(attn)
    if attn.target is LATENT_ATTENTION:
        inv = schema.get(attn, "inv_freq")
        if inv is None:
            return NoMatch(f"layer {layer}: latent attention without a rotary table")
        return RopeInfo(inv, float(schema.get(attn, "rope_scaling")), int(attr_tensor(gm, str(inv.target)).shape[0]))
    k_new = new_keys(attn)
    if not k_new:
        return k_new
    tables = {}
    for cos in (n for n in _backward(k_new) if n.target is aten.cos.default):
        invs = [n for n in _backward(cos) if _is_inv_freq(n)]
        for inv in invs:
            tables.setdefault(str(inv.target), (inv, _scaling(cos)))
    if not tables:
        return NoMatch(f"layer {layer}: no rotary table (cos of an inv_freq) on the key path")
    if len(tables) > 1:
        return NoMatch(f"layer {layer}: keys are rotated by more than one table ({sorted(tables)})")
    ((target, (inv, scaling)),) = tables.items()
    return RopeInfo(inv, scaling, int(attr_tensor(gm, target).shape[0]))


@dataclass
class KeyNorm:
    """A per-head RMSNorm on the keys before RoPE (Qwen3, Gemma-3): k * rsqrt(mean(k^2) + eps) * weight."""

    weight: torch.Tensor  # the effective multiplier [D] (Gemma: 1 + the stored weight, in fp32)
    eps: float
    target: str  # the stored weight's get_attr target


_CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout}


def _through_casts_down(n):
    while len(n.users) == 1 and next(iter(n.users)).target in _CASTS:
        n = next(iter(n.users))
    return n


def _through_casts_up(n):
    while isinstance(n, torch.fx.Node) and n.target in _CASTS:
        n = source(n)
    return n


def _multiplier(gm, n) -> tuple[torch.Tensor, str] | None:
    """get_attr w -> w; add(get_attr w, c) -> w + c (Gemma's 1 + weight), computed in fp32."""
    n = _through_casts_up(n)
    if not isinstance(n, torch.fx.Node):
        return None
    if n.op == "get_attr":
        return attr_tensor(gm, str(n.target)).float(), str(n.target)
    if n.target is aten.add.Tensor and len(n.args) == 2:
        a, c = n.args
        a = _through_casts_up(a)
        if isinstance(c, (int, float)) and isinstance(a, torch.fx.Node) and a.op == "get_attr":
            return attr_tensor(gm, str(a.target)).float() + c, str(a.target)
    return None


def key_norm(sg, attn) -> KeyNorm | NoMatch | None:
    """The RMSNorm on ``attn``'s new keys between the projection and RoPE; None without one;
    ``NoMatch`` when the key path normalises (an ``rsqrt``) in a way not recognised here.

    Matches ``mul(mul(x, rsqrt(add(mean(pow(x, 2), [-1], keepdim), eps))), w)`` with ``w`` a
    weight or ``weight + c`` (either operand order, dtype casts anywhere in between).
    """
    gm = _gm(sg)
    k_new = new_keys(attn)
    if not k_new:
        return k_new
    rsqrts = [n for n in _backward(k_new) if n.target is aten.rsqrt.default]
    if not rsqrts:
        return None  # no norm is not a failure
    if len(rsqrts) > 1:
        return NoMatch(f"layer {schema.layer_of(attn)}: {len(rsqrts)} rsqrt nodes on the key path; expected one RMSNorm")
    (r,) = rsqrts
    add = r.args[0]
    if add.target is not aten.add.Tensor or not isinstance(add.args[1], (int, float)):
        return NoMatch(f"layer {schema.layer_of(attn)}: key-path rsqrt is not of mean(x^2) + eps")
    eps = float(add.args[1])
    mean = add.args[0]
    if mean.target is not aten.mean.dim or list(mean.args[1]) not in ([-1], [3]):
        return NoMatch(f"layer {schema.layer_of(attn)}: key-path rsqrt does not normalise the head dimension")
    normed = [u for u in r.users if u.target is aten.mul.Tensor]
    if len(normed) != 1:
        return NoMatch(f"layer {schema.layer_of(attn)}: key-norm rsqrt feeds no single multiply")
    scaled = _through_casts_down(normed[0])
    for u in scaled.users:
        if u.target is aten.mul.Tensor and len(u.args) == 2:
            other = u.args[1] if u.args[0] is scaled else u.args[0]
            w = _multiplier(gm, other)
            if w is not None:
                return KeyNorm(w[0], eps, w[1])
    return NoMatch(f"layer {schema.layer_of(attn)}: key norm without a recognisable weight multiply")


@dataclass
class LayerSite:
    """One layer's attention node and the cache around it (``layer_site``)."""

    layer: int
    module: str
    attn: torch.fx.Node  # read its arguments with ``arg(name)`` (schema.get)
    k_cat: torch.fx.Node  # cat([k_cache, k_new], dim): what the attention reads as keys (latent: c_k)
    v_cat: torch.fx.Node
    k_cache: torch.fx.Node  # state placeholders
    v_cache: torch.fx.Node
    k_name: str  # their state names
    v_name: str
    latent: bool = False  # graphwright.latent_attention over a latent cache shared by the KV heads
    latent_k_width: int = 0  # r_k: where c_k ends in the shared [c_k | c_v] eviction payload
    # eviction: the policy op's inputs by name (q, k, v, q_pos, k_pos, scale), set by rewrite_layers
    inputs: dict = field(default_factory=dict)
    proj: object = None  # lowrank_kv: the layer's projection facts (lowrank_rewrite.kv_projections)
    touched: list | None = None  # nodes a rewrite added or re-shaped (their meta['val'] is recomputed)

    @property
    def k_new(self) -> torch.fx.Node:
        return cat_parts(self.k_cat)[1]

    def arg(self, name, default=None):
        """The attention node's argument ``name`` (``default`` when this variant has no such argument)."""
        return schema.get(self.attn, name, default)


def state_spec(sg, placeholder):
    """The ``StateSpec`` a state placeholder holds (None for the fixed and extra inputs)."""
    phs = [n for n in sg.gm.graph.nodes if n.op == "placeholder"]
    i = phs.index(placeholder) - 3 if placeholder in phs else -1  # input_ids, positions, logits_index first
    return sg.state[i] if 0 <= i < len(sg.state) else None


def layer_site(sg, attn) -> LayerSite | NoMatch:
    """The layer's cache cats and state inputs around a dense or latent attention node, or why not.

    Dense: ``k``/``v`` are ``cat([cache, new], 2)``; latent: ``c_k``/``c_v`` are ``cat([cache, new], 1)``
    (negative dims accepted); each cache is a ``kv`` state input.
    """
    meta = attn.meta.get("graphwright") or {}
    layer, module = meta.get("layer"), meta.get("module", "")
    where = f"layer {layer}"
    if attn.target not in (ATTENTION, LATENT_ATTENTION):
        return NoMatch(f"{where}: {attn.target} is neither graphwright.attention nor graphwright.latent_attention")
    latent = attn.target is LATENT_ATTENTION
    names, dims = (("c_k", "c_v"), (1, -2)) if latent else (("k", "v"), (2, -2))
    found = []
    for name in names:
        m = cache_concat(schema.get(attn, name), dims)
        if not m:
            return NoMatch(f"{where}: attention {name} is not cat([cache, new], {dims[0]}) (already rewritten?)")
        spec = state_spec(sg, m.cache)
        if spec is None or spec.kind != "kv":
            return NoMatch(f"{where}: attention {name} does not read a kv state input")
        found.append((m, spec))
    (k, k_spec), (v, v_spec) = found
    return LayerSite(int(layer) if layer is not None else -1, module, attn, k.cat, v.cat, k.cache, v.cache,
                     k_spec.name, v_spec.name, latent, k_spec.shape[-1] if latent else 0)
