"""StreamingLLM in the ONNX artifact without re-rotating the cache: keys cached rotated at their absolute positions.

Technique: StreamingLLM (arXiv 2309.17453, ``pos_shift``) rotates each cached key by its index in
the cache and the query by its own. The step graph caches pre-RoPE keys and every step rotated all
of them again (``rope_cache_index``); the decode graph (``decode_slots.rope_cache_index_decode``)
also ranked its unordered slots by position with an S x S comparison per KV head per layer. This is
the torch backend's ``codegen/torch/streaming_shift.py`` written for export: RoPE scores depend
only on the difference of the two angles, and StreamingLLM's cache is ``sinks`` tokens at positions
0..sinks-1 plus a run of consecutive positions. With E = tokens evicted from the row so far
(``max(0, L - 1 - sinks - window)``, L the row's length with the new token), a window key at
position p has cache index p - E and the query (position L - 1) index L - 1 - E; a sink keeps index
= position. So with every key cached as the model rotated it:

* window keys: ``q_abs . k_abs`` (their angles differ by L - 1 - p, the cache-index difference);
* sink keys: the query rotated back by E, ``R(-E) q_abs``, against ``k_abs``.

``shift_streaming(gm, decode)`` rewrites every dense StreamingLLM layer of a copy of the step graph
(``rope_invert`` of the new key -> ``cat`` into the cache -> ``rope_cache_index`` -> ``attention``,
the same cache read by ``evict_streaming``): the cache takes the model's post-RoPE key (so the
state layout changes for ``model.onnx`` and ``decode.onnx`` alike; both must be rewritten), and

* ``decode=True`` (``decode.onnx``, T = 1): attention is ``shifted_decode_attention``: both
  queries of each head (q and R(-E) q) against the keys (two MatMuls [B, Hk, g, S]), a ``Where``
  on ``k_pos < sinks`` picks the sink score per slot, then the mask (``k_pos >= 0`` at T = 1), fp32
  Softmax and MatMul with v.
  No key is rotated and nothing is ranked; the slots may be in any order;
* ``decode=False`` (``model.onnx``, any T): the keys are inverted at their own positions
  (``invert_slots``: ``rope_invert``'s math per slot, the same fp32 angles) and ``rope_cache_index``
  + attention run as before: exactly the reference's inputs, one rotation of S keys more per
  prompt step (O(S D), beside the O(T S D) attention).

The eviction (``decode_slots.streaming_decode``, ``prompt_slots.streaming_prompt``) only reads
positions, so it is unchanged. Layers with an attention window or attention sinks of their own,
latent keys (``lowrank_kv``) or other users of the pre-RoPE tensors are left as they are.

Exact setting: none of its own (exact in real arithmetic); fp32 rounding differs from rotating by
cache index. Invariant tested (``tests/onnx/test_onnx_streaming_shift.py``): the artifact keeps the
same position sets per (row, KV head) as the compacting references after every step, greedy tokens
equal and logits within 1e-4 over 120 decode steps with eviction at every step (tiny Llama, batch
2 left-padded); the cached keys are the reference's pre-RoPE keys rotated at their positions;
``decode.onnx`` has no S x S rank and no key rotation; the op-level function equals the reference
composition on unordered slots.
"""

from __future__ import annotations

import copy

import torch

from ...ops import schema
from ...ops.eviction import ROPE_CACHE_INDEX
from ...ops.rope_index_ref import rope_angles
from ..torch.streaming_shift import invert_slots, match_streaming_layer  # the torch backend's inversion and matcher

MASKED = torch.finfo(torch.float32).min


def rotation_matrix(cos, sin, D: int) -> torch.Tensor:
    """[B, D, D] fp32 M with ``x @ M`` = ``rope_index_ref._rotate(x, cos, sin, 1.0)`` for x [..., D] (``cos``/``sin``
    [B, R], R <= D: rotate-half on the first R dims, the rest passed through).

    One MatMul per layer instead of the Slice/Split, Neg, Concat, two Mul and Add of the elementwise form;
    M depends only on the step's positions, so ORT computes it once for every layer (common subexpressions).
    Each output is the same two products summed (plus exact zeros), up to the MatMul's fused multiply-add."""
    R = cos.shape[-1]
    half = R // 2
    eye = torch.eye(D, dtype=torch.float32, device=cos.device)
    swap = torch.cat([-eye[:, half:R], eye[:, :half]], dim=1)  # [D, R]: x @ swap = rotate_half(x[..., :R])
    m = eye[:, :R] * cos[:, None, :] + swap * sin[:, None, :]  # [B, D, R]
    return torch.cat([m, eye[:, R:].expand(m.shape[0], D, D - R)], dim=2) if R < D else m


def shifted_decode_attention(q, k, v, q_pos, k_pos, scale: float, key_bias, inv_freq, sinks: int, window: int):
    """``attention(rope_cache_index(rope_invert(q), pre-RoPE k))`` at a T = 1 step of a StreamingLLM layer
    whose keys ``k`` [B, Hk, S, D] are rotated at their positions ``k_pos`` [B, Hk, S] (any slot order).

    ``q`` [B, H, 1, D]: the model's post-RoPE query at ``q_pos`` [B, 1]; ``sinks``/``window``: the
    StreamingLLM op's budget (the cache holds at most sinks + window + 1 tokens: the previous step's
    kept set and the new token). Returns [B, H, 1, Dv] in v's dtype (computed in fp32)."""
    B, H, _, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    evicted = (q_pos.max(dim=1).values - sinks - window).clamp(min=0)  # [B]: L - 1 - sinks - window
    cos, sin = rope_angles(evicted, inv_freq)  # [B, R]
    qf = q.float()
    back = torch.matmul(qf, rotation_matrix(cos, -sin, D)[:, None])  # R(-E) q: the query at its cache index
    kt = k.float().transpose(-1, -2)
    # per KV head: g x q and g x R(-E) q against the keys, two MatMuls (each fused with the scale by ORT): no
    # Reshape/Split of a stacked [2g, S] product, whose dynamic target shape cost Shape/Concat nodes per layer
    s_window = torch.matmul(qf.reshape(B, Hk, g, D), kt) * scale
    s_sink = torch.matmul(back.reshape(B, Hk, g, D), kt) * scale
    s = torch.where((k_pos < sinks)[:, :, None, :], s_sink, s_window)  # [B, Hk, g, S]
    if key_bias is not None:
        s = s + key_bias.float().reshape(B, Hk, g, S)
    # T = 1: every cached position precedes the query and a padding query sees every valid key (the reference's
    # rule (k_pos >= 0) & ((k_pos <= q) | q < 0) reduced); the new key has the query's position, -1 when padding
    p = torch.softmax(torch.where((k_pos >= 0)[:, :, None], s, MASKED), dim=-1)
    out = torch.matmul(p, v.float())  # [B, Hk, g, Dv]
    return out.reshape(B, H, 1, v.shape[-1]).to(v.dtype)


def _is_cat(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.cat.default


def _cat_new_key(k_all):
    """The new key of the ONNX step graph's two-input ``cat`` along the sequence dim, else None."""
    if not _is_cat(k_all) or len(k_all.args[0]) != 2 or (k_all.args[1] if len(k_all.args) > 1 else 0) not in (2, -2):
        return None
    return k_all.args[0][1]


def _layer(qk):
    """The torch backend's layer match (``match_streaming_layer``) on the ONNX graph's ``cat`` append, for
    attentions that read the op's own positions and have no native window or sinks."""
    found = match_streaming_layer(qk, _cat_new_key)
    if found is None:
        return None
    attn, kp_all = found[4], schema.get(qk, "k_pos")
    if schema.get(attn, "k_pos") is not kp_all or schema.get(attn, "window") or schema.get(attn, "sinks"):
        return None
    return found


def shift_streaming(gm: torch.fx.GraphModule, decode: bool):
    """A copy of ``gm`` whose dense StreamingLLM layers cache post-RoPE keys (module docstring); returns
    ``(gm, layers)``, ``layers`` the rewritten layers' indices (``gm`` itself when there are none)."""
    if not any(n.op == "call_function" and n.target is ROPE_CACHE_INDEX for n in gm.graph.nodes):
        return gm, []
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph, layers = gm.graph, []
    for qk in [n for n in graph.nodes if n.op == "call_function" and n.target is ROPE_CACHE_INDEX]:
        found = _layer(qk)
        if found is None:
            continue
        q_pre, k_all, kn_pre, gets, attn, evict = found
        inv, scaling = schema.get(qk, "inv_freq"), schema.get(qk, "scaling")
        kp_all = schema.get(qk, "k_pos")
        k_all.args = ([k_all.args[0][0], schema.get(kn_pre, "x")], *k_all.args[1:])  # the cache takes the rotated key
        graph.erase_node(kn_pre)
        layers.append(evict.meta.get("graphwright", {}).get("layer"))
        if not decode:  # the reference's inputs: keys inverted at their own positions
            with graph.inserting_before(qk):
                k_pre = graph.call_function(invert_slots, (k_all, kp_all, inv, scaling))
            qk.args = tuple(k_pre if a is k_all else a for a in qk.args)
            qk.kwargs = {n: (k_pre if a is k_all else a) for n, a in qk.kwargs.items()}
            continue
        a = {n: schema.get(attn, n) for n in ("v", "q_pos", "scale", "key_bias")}
        with graph.inserting_before(attn):
            new = graph.call_function(shifted_decode_attention,
                                      (schema.get(q_pre, "x"), k_all, a["v"], a["q_pos"], kp_all, a["scale"], a["key_bias"],
                                       inv, int(schema.get(evict, "sinks")), int(schema.get(evict, "window"))))
        new.meta = dict(attn.meta)
        attn.replace_all_uses_with(new)
        for n in (attn, *gets, qk):
            graph.erase_node(n)
        if not q_pre.users:
            graph.erase_node(q_pre)
    graph.lint()
    gm.recompile()
    return gm, layers
