"""StreamingLLM decode without re-rotating the cache: keys cached rotated at their absolute position.

Technique: StreamingLLM (arXiv 2309.17453, ``pos_shift``) rotates every cached key by its index in
the cache and the query by its own, so each decode step re-rotated all S cached keys of every layer
(``rope_cache_index``: the cache holds pre-RoPE keys). RoPE scores depend only on the difference of
the two angles, and StreamingLLM's cache is ``sinks`` tokens at positions 0..s-1 plus a run of
consecutive positions (the window; the invariant the slot ops assume: the cache entering a step is
the previous step's kept set). With E = the number of tokens that have left the row
(``max(0, L - 1 - sinks - window)``, L the row length with the new token), a window key at position
p has cache index p - E and the query (position L - 1) has index L - 1 - E; a sink keeps index = its
position. So, with every key cached as the model rotated it (absolute position, the dense layout):

* window keys: ``q_abs . k_abs`` (angles differ by L - 1 - p = the cache-index difference);
* sink keys: the query rotated back by E (``R(-E) q_abs``, its cache index) against ``k_abs``.

A decode step computes both [g, S] score rows in one matmul (the 2g queries of a KV head) and picks
per slot (position < sinks: the sink row), then masks, softmaxes and multiplies by v as
``decode_probs.slot_probs`` does. No key is rotated; the query's rotation by -E is computed once
per step for all layers (``step_memo``). While no row has lost a token (S <= sinks + window, static)
the cache index equals the position and the step is the dense SDPA. Any other step (a prompt, a
window or attention-sink argument on the attention) inverts the keys at their own positions and runs
``rope_cache_index`` as before, which is exactly the reference's input (``rope_invert`` at the same
fp32 angles).

``streaming_rope_shift`` is the torch backend's lowering transform: per StreamingLLM layer it
caches the model's post-RoPE key (drops ``rope_invert`` of the new key and of the query) and calls
``streaming_attention`` in place of ``rope_cache_index`` + attention. The state's keys are then
post-RoPE on the torch and ``compiled`` backends (the compiled backend's static decode rewrite turns
``streaming_attention`` into ``static_eviction.streaming_attention_static``; the ONNX decode graph keeps
the pre-RoPE layout of the step graph and does not run this transform). Latent layers (keys rebuilt
from c_k) are left as they are.

Exact setting: none of its own (exact in real arithmetic); fp32 rounding differs from rotating by
cache index (angles at absolute positions). Invariant tested (``tests/codegen/test_streaming_shift.py``):
same kept sets per (row, head) as the compacting references after every step and logits within
1e-4 over hundreds of decode steps on a ragged left-padded batch (tiny Llama, tiny Qwen2, tiny
Gemma3); the lowered decode graph has no ``rope_cache_index``/``rope_invert`` in the rewritten layers.
"""

from __future__ import annotations

import operator

import torch

from ...capture.ops import ATTENTION
from ...ops import schema
from ...ops.eviction import EVICT_STREAMING, ROPE_CACHE_INDEX, ROPE_INVERT
from ...ops.rope_index_ref import _rotate, rope_angles, rope_invert_reference
from .attention import attention_sdpa
from .cache_append import cache_append
from .eviction_slots import rope_cache_index_ranked
from .step_memo import memo, slot_memo, step_info


def _query_map(q_pos, inv_freq, sinks: int, window: int, D: int, scale: float) -> torch.Tensor:
    """[B, 1, D, 2D] fp32: ``q @ W`` gives [scale * q, scale * R(-E) q] per row (the query as rotated by the
    model, and rotated back by E = tokens evicted so far: its cache index). Made once per step, shared by
    every layer with this rotary table (``step_memo``)."""
    info = step_info(q_pos)
    key = ("stream_map", sinks, window, id(inv_freq), D, scale)

    def make():
        E = (info.length - 1 - sinks - window).clamp(min=0)
        cos, sin = rope_angles(E, inv_freq)  # [B, R]: the reference's fp32 angle function
        eye = torch.eye(D, device=q_pos.device)
        back = _rotate(eye[None, None], cos[:, None, None], -sin[:, None, None], 1.0)  # row i = R(-E) e_i
        return inv_freq, torch.cat([eye.expand_as(back), back], dim=-1) * scale

    hit = memo(info, key, make)
    if hit[0] is not inv_freq:  # another table under a reused id: rebuild
        hit = info.extra[key] = make()
    return hit[1]


def _slot_bias(info, k_pos, sinks: int, window: int) -> torch.Tensor:
    """[B, Hk, 1, 2, S] fp32: 0 where a slot is read with the matching query (row 0: window keys with the
    model's query, row 1: sink keys with the shifted one), ``finfo.min`` elsewhere and on invisible slots.
    Shared by the layers of a step whose positions are equal (``step_memo.slot_memo``)."""
    plan = slot_memo(info, ("slots", sinks, window), k_pos)
    bias = plan.get("bias")
    if bias is None:
        visible = (k_pos >= 0) & (k_pos <= info.q_lift)
        sink = k_pos < sinks
        take = torch.stack([visible & ~sink, visible & sink], dim=2)[:, :, None]
        bias = plan["bias"] = torch.zeros(take.shape).masked_fill_(~take, torch.finfo(torch.float32).min)
    return bias


def _shifted_decode(q, k, v, q_pos, k_pos, scale, key_bias, inv_freq, sinks: int, window: int):
    """One query per row over slots whose keys are rotated at their absolute positions (module docstring).

    Both queries of every head come from one matmul (``_query_map``), both score rows of every KV head
    from one ``bmm``; the softmax runs over the 2S scores of which exactly S are not masked (per slot the
    one its query should see), and the two halves of P (one of them exactly 0 per slot) are summed."""
    B, H, _, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    info = step_info(q_pos)
    qq = torch.matmul(q if q.dtype == torch.float32 else q.float(), _query_map(q_pos, inv_freq, sinks, window, D, scale))
    kf = k if k.dtype == torch.float32 else k.float()
    s2 = torch.bmm(qq.view(B * Hk, 2 * g, D), kf.flatten(0, 1).transpose(1, 2)).view(B, Hk, g, 2, S)
    s2 = s2 + _slot_bias(info, k_pos, sinks, window)
    if key_bias is not None:
        s2 = s2 + key_bias.float().view(B, Hk, g, 1, S)
    p = torch.softmax(s2.view(B, Hk, g, 2 * S), dim=-1).view(B * Hk, g, 2, S).sum(dim=2)
    vf = v if v.dtype == torch.float32 else v.float()
    out = torch.bmm(p, vf.flatten(0, 1)).view(B, H, 1, v.shape[-1])
    return out if out.dtype == v.dtype else out.to(v.dtype)


def invert_slots(k, k_pos, inv_freq, scaling: float):
    """Pre-RoPE keys [B, Hk, S, D] from keys rotated at their own positions ``k_pos`` [B, Hk, S]
    (``rope_invert_reference``'s math per slot; empty slots, -1, are rotated as position 0)."""
    cos, sin = rope_angles(k_pos, inv_freq)
    return _rotate(k, cos, -sin, 1.0 / scaling)


def streaming_attention(q, k, v, q_pos, k_pos, scale, window, key_bias, attn_sinks, pos, inv_freq, scaling,
                        keep_sinks: int, keep_window: int):
    """``attention(rope_cache_index(rope_invert(q), pre-RoPE k))`` with ``k`` cached at absolute positions.

    ``q``: the model's post-RoPE query; ``k`` [B, Hk, S, D]: keys rotated at their positions ``k_pos``;
    ``window``/``key_bias``/``attn_sinks``: the attention op's own arguments; ``pos``: the positions the
    graph inverted the query at; ``keep_sinks``/``keep_window``: the StreamingLLM op's budget."""
    T, S = q.shape[2], k.shape[2]
    if T == 1 and k_pos.dim() == 3 and not window and not attn_sinks:
        if S <= keep_sinks + keep_window:  # no row has lost a token: every cache index is the position
            return attention_sdpa(q, k, v, q_pos, k_pos, scale, window, key_bias, attn_sinks)
        return _shifted_decode(q, k, v, q_pos, k_pos, scale, key_bias, inv_freq, keep_sinks, keep_window)
    # any other step: the reference's inputs (pre-RoPE q and keys), rotated by cache index
    q_rot, k_rot = rope_cache_index_ranked(rope_invert_reference(q, pos, inv_freq, scaling),
                                           invert_slots(k, k_pos, inv_freq, scaling), k_pos, inv_freq, scaling)
    return attention_sdpa(q_rot, k_rot, v, q_pos, k_pos, scale, window, key_bias, attn_sinks)


# ----------------------------------------------------------------------------------- the lowering transform
def match_streaming_layer(qk, new_key):
    """The nodes of one dense StreamingLLM layer around ``rope_cache_index`` node ``qk``, or None when the
    pattern differs (latent layers, other users of the rotated or pre-RoPE tensors):
    ``(q_pre, k_all, kn_pre, getitems, attention, evict)``. ``new_key(k_all)`` gives the pre-RoPE new-key
    node appended into the cache node ``k_all``, or None when ``k_all`` is not the backend's append (the
    torch backend's in-place ``cache_append``, the ONNX graph's ``cat``); one matcher serves both."""
    q_pre, k_all, kp_all, inv, scaling = (schema.get(qk, n) for n in ("q", "k", "k_pos", "inv_freq", "scaling"))
    if not (isinstance(q_pre, torch.fx.Node) and q_pre.target is ROPE_INVERT):
        return None
    kn_pre = new_key(k_all)
    if not (isinstance(kn_pre, torch.fx.Node) and kn_pre.target is ROPE_INVERT and len(kn_pre.users) == 1):
        return None
    for n in (q_pre, kn_pre):
        if schema.get(n, "inv_freq") is not inv or schema.get(n, "scaling") != scaling:
            return None
    gets = list(qk.users)
    if len(gets) != 2 or any(u.target is not operator.getitem for u in gets):
        return None
    gets.sort(key=lambda u: u.args[1])
    attn = next(iter(gets[0].users), None)
    if attn is None or attn.target != ATTENTION or any(set(u.users) != {attn} for u in gets):
        return None
    if schema.get(attn, "q") is not gets[0] or schema.get(attn, "k") is not gets[1]:
        return None
    evict = [u for u in k_all.users if u is not qk]
    if len(evict) != 1 or evict[0].target is not EVICT_STREAMING or schema.get(evict[0], "k") is not k_all \
            or schema.get(evict[0], "k_pos") is not kp_all:
        return None
    return q_pre, k_all, kn_pre, gets, attn, evict[0]


def _appended_key(k_all):
    """The new key appended by the torch backend's ``cache_append`` along the sequence dim, else None."""
    if isinstance(k_all, torch.fx.Node) and k_all.target is cache_append and k_all.args[2] == 2:
        return k_all.args[1]
    return None


def streaming_rope_shift(graph: torch.fx.Graph) -> None:
    """Torch-backend lowering transform (after ``append_caches_in_place``): every dense StreamingLLM layer caches
    post-RoPE keys and attends through ``streaming_attention`` (module docstring)."""
    for qk in [n for n in graph.nodes if n.op == "call_function" and n.target is ROPE_CACHE_INDEX]:
        found = match_streaming_layer(qk, _appended_key)
        if found is None:
            continue
        q_pre, k_pre, kn_pre, gets, attn, evict = found
        inv, scaling = schema.get(qk, "inv_freq"), schema.get(qk, "scaling")
        k_pre.args = (k_pre.args[0], schema.get(kn_pre, "x"), 2)  # the cache takes the model's rotated key
        a = {n: schema.get(attn, n) for n in ("v", "q_pos", "k_pos", "scale", "window", "key_bias", "sinks")}
        attn.target = streaming_attention
        attn.args = (schema.get(q_pre, "x"), k_pre, a["v"], a["q_pos"], a["k_pos"], a["scale"], a["window"],
                     a["key_bias"], a["sinks"], schema.get(q_pre, "pos"), inv, scaling,
                     int(schema.get(evict, "sinks")), int(schema.get(evict, "window")))
        attn.kwargs = {}
        for n in (*gets, qk, kn_pre):
            graph.erase_node(n)
        if not q_pre.users:
            graph.erase_node(q_pre)
    graph.lint()
