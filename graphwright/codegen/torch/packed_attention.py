"""Lowering transform: a decode step over a packed per-layer cache attends to the packed buffer itself.

The packed cache of head-adaptive SnapKV / PyramidKV / ``snapkv(heads="scores")`` (``passes/packed_rewrite.py``)
stores a layer's kept slots of every KV head in one buffer k, v [B, 1, N, D] with per-head positions
[B, Hk, N] (-1 where a slot is another head's). The graph's attention reads that buffer expanded to the Hk
heads and concatenated with the step's new tokens in the dense per-head layout::

    k_wide = cat([k_cache.expand(-1, Hk, -1, -1), k_new], 2)     # [B, Hk, N + T, D]
    attention(q, k_wide, v_wide, q_pos, cat([kp_cache, q_pos[:, None].expand(-1, Hk, -1)], 2), ...)

right for a prompt on an empty cache (dense causal attention, SDPA's fast path), but at a decode step the
``cat`` copies Hk x the layer's whole buffer and the attention reads it Hk times (SmolLM2-135M, 4k prompt,
``snapkv(budget=1024, heads="scores", gamma=1, headset="shipped:mass")``: 92.6 ms per step against 57.2 ms for
uniform SnapKV at the same total budget; the profile puts 10 ms per step in that ``cat`` and 12 ms more in SDPA;
``python bench/profile_decode_step.py --prompts 4096 --steps 8 --recipes snapkv25 mass25 --backends torch --no-hf
--profile``).

The same step also appends the new tokens to the packed buffer (``k_all = cat([k_cache, pack_heads(k_new)], 2)``,
in place on the torch backend: ``cache_append``) with their per-head positions (``kp_all``), and those are exactly
the keys the step attends to. So this transform points each such attention at ``attention_packed``, which for a
single decode query (no window, sinks or key bias) attends over ``k_all``, ``v_all`` with the H query heads as H
query rows of one shared KV head: one SDPA call, mask [B, 1, H, N + Hk] = each query head's KV head's slots
(``visible_mask`` on ``kp_all``, repeated over the g query heads of a KV head). K and V are read once, as uniform
SnapKV reads its Hk * C slots once; nothing is copied. Any other step (a prompt, several tokens, a windowed or
biased attention) builds the graph's wide view inside the call and runs ``attention_sdpa`` on it, as before.

Exact: the same keys, values and visibility per query head, only the layout differs (fp32 within 1e-5 of the
reference backend: SDPA sums the slots in another order). Tested (``tests/codegen/test_packed_attention.py``):
the lowered torch graph of a packed recipe calls ``attention_packed`` in every layer and keeps no expand-``cat``;
logits and greedy tokens equal the reference backend's over decode steps on a left-padded batch (tiny Llama,
``heads="adaptive"``, ``pyramid=`` and ``heads="scores"``); the op on random packed buffers equals
``attention_reference`` on the wide view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...capture.ops import ATTENTION, visible_mask
from ...ops import schema
from ...ops.graph_match import cat_dim, cat_parts, is_cat
from ...ops.policy_adakv import PACK_HEADS, PACKED_POSITIONS
from .attention import attention_sdpa
from .cache_append import cache_append

_EXPAND = torch.ops.aten.expand.default
_UNSQUEEZE = torch.ops.aten.unsqueeze.default


def attention_packed(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, sinks=0, *, k_cache, k_new, v_cache,
                     v_new, kp_cache):
    """``attention`` over a packed cache. ``k``, ``v`` [B, 1, N + Hk*T, D], ``k_pos`` [B, Hk, N + Hk*T]: the packed
    buffers after this step's append; ``k_cache``/``k_new`` (and v, ``kp_cache``): the parts of the graph's wide
    view, built only for steps that are not a plain decode query."""
    hk = k_new.shape[1]
    if q.shape[2] == 1 and not window and not sinks and key_bias is None:
        return packed_decode(q, k, v, q_pos, k_pos, scale)
    kw = torch.cat([k_cache.expand(-1, hk, -1, -1), k_new], 2)
    vw = torch.cat([v_cache.expand(-1, hk, -1, -1), v_new], 2)
    kp = torch.cat([kp_cache, q_pos[:, None].expand(-1, hk, -1)], 2)
    return attention_sdpa(q, kw, vw, q_pos, kp, scale, window, key_bias, sinks)


def packed_decode(q, k, v, q_pos, k_pos, scale):
    """One decode query per head over the packed slots: q [B, H, 1, D] as H rows of one KV head [B, 1, S, D]; query
    head h sees the slots ``k_pos[:, h // g]`` marks visible (g = H / Hk). Returns [B, H, 1, Dv]."""
    B, H, _, D = q.shape
    hk, S = k_pos.shape[1], k_pos.shape[2]
    mask = visible_mask(q_pos, k_pos)[:, :, 0, 0]  # [B, Hk, S]
    mask = mask[:, :, None].expand(B, hk, H // hk, S).reshape(B, 1, H, S)
    out = F.scaled_dot_product_attention(q.reshape(B, 1, H, D), k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, H, 1, v.shape[-1])


def _target(node) -> object:
    return node.target if isinstance(node, torch.fx.Node) and node.op == "call_function" else None


def _wide_parts(node):
    """``cat([expand(cache, [-1, Hk, -1, -1]), new], 2)`` -> (cache placeholder, new, Hk), else None."""
    if not is_cat(node) or cat_dim(node) != 2:
        return None
    parts = cat_parts(node)
    if len(parts) != 2 or _target(parts[0]) is not _EXPAND:
        return None
    cache, shape = parts[0].args[0], list(parts[0].args[1])
    if not (isinstance(cache, torch.fx.Node) and cache.op == "placeholder") or len(shape) != 4:
        return None
    return cache, parts[1], shape[1]


def _appended(cache, op, new_arg) -> torch.fx.Node | None:
    """The ``cache_append(cache, op(new_arg, ...), 2)`` user of ``cache`` (the packed append), else None."""
    for u in cache.users:
        if _target(u) is cache_append and u.args[2] == 2 and _target(u.args[1]) is op and u.args[1].args[0] is new_arg:
            return u
    return None


def _kp_parts(node, q_pos, hk):
    """``cache_append(kp_cache, expand(unsqueeze(q_pos, 1), [-1, Hk, -1]), 2)`` -> kp_cache, else None."""
    if _target(node) is not cache_append or node.args[2] != 2:
        return None
    kp_cache, new = node.args[0], node.args[1]
    if _target(new) is not _EXPAND or list(new.args[1]) != [-1, hk, -1]:
        return None
    inner = new.args[0]
    if _target(inner) is not _UNSQUEEZE or inner.args[0] is not q_pos or inner.args[1] != 1:
        return None
    return kp_cache


def _before(nodes, node) -> bool:
    """Every one of ``nodes`` comes before ``node`` in the graph (the append runs before the attention reads it)."""
    seen = set()
    for n in node.graph.nodes:
        if n is node:
            return all(x in seen for x in nodes)
        seen.add(n)
    return False


def _erase_dead(graph, node) -> None:
    """Erase ``node`` and then any of its call_function inputs left without users (views and cats only here)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.users:
        return
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    for n in inputs:
        if _target(n) in (_EXPAND, _UNSQUEEZE, torch.ops.aten.cat.default, cache_append):
            _erase_dead(graph, n)


def packed_decode_attention(graph: torch.fx.Graph) -> None:
    """Point every attention over a packed cache's wide view at ``attention_packed`` (module docstring)."""
    for node in list(graph.nodes):
        if _target(node) is not ATTENTION:
            continue
        k_wide, v_wide, kp_att, q_pos = (schema.get(node, n) for n in ("k", "v", "k_pos", "q_pos"))
        kparts, vparts = _wide_parts(k_wide), _wide_parts(v_wide)
        if kparts is None or vparts is None or kparts[2] != vparts[2]:
            continue
        hk = kparts[2]
        kp_cache = _kp_parts(kp_att, q_pos, hk)
        k_all = _appended(kparts[0], PACK_HEADS, kparts[1])
        v_all = _appended(vparts[0], PACK_HEADS, vparts[1])
        kp_all = _appended(kp_cache, PACKED_POSITIONS, q_pos) if kp_cache is not None else None
        if k_all is None or v_all is None or kp_all is None or not _before((k_all, v_all, kp_all), node):
            continue
        schema.set(node, "k", k_all)
        schema.set(node, "v", v_all)
        schema.set(node, "k_pos", kp_all)
        node.target = attention_packed
        node.kwargs = {**node.kwargs, "k_cache": kparts[0], "k_new": kparts[1], "v_cache": vparts[0], "v_new": vparts[1],
                       "kp_cache": kp_cache}
        for dead in (k_wide, v_wide, kp_att):
            _erase_dead(graph, dead)
