"""Slot eviction inside the compiled decode step: fixed-capacity per-head slot buffers, written in place.

The compiled backend (``compiled.py``) runs decode over static buffers so that ``torch.compile``
sees the same shapes at every step. An eviction layer whose decode-time state has a fixed size
fits that scheme: H2O and StreamingLLM with token-count budgets hold at most ``c`` tokens per KV
head (``c = heavy + recent`` or ``sinks + window``), SnapKV evicts at prefill only and appends at
decode. ``eviction_decode_rewrite`` rewrites a copy of the lowered graph (the decode graph) so that:

* each state of an H2O / StreamingLLM layer (k, v, key positions, H2O's running score) is a buffer
  of at most ``c + 1`` slots; the new token goes, per (row, KV head), into the head's first empty
  slot (``free_slot``: k_pos -1; the buffer always has one, since a head holds <= c tokens between
  steps), written in place (``head_slot_write``, a ``scatter_``) where the graph appended it;
* attention reads every slot with its position (-1 masked; softmax ignores slot order), as on
  the torch backend's slots (``eviction_slots.py``);
* the eviction op becomes ``h2o_static`` / ``streaming_static``: the same victim as the torch
  backend's slot functions and the ONNX decode graph (H2O: argmin of the running score over the
  non-recent slots, ties to the latest position, when a head holds more than ``heavy`` of them;
  StreamingLLM: the slot of position ``L - 1 - window``), and eviction is marking that slot empty
  (k_pos -1, in place). Nothing moves, nothing is gathered, the state's shapes never change, and
  there is no host synchronisation;
* ``rope_cache_index`` (StreamingLLM: keys rotated by cache index) ranks the slots by position
  (``eviction_slots.position_rank``) and rotates the query by its head's valid count - 1 (the new
  token holds the latest position), as the reference does on its position-ordered cache;
* SnapKV's op returns its inputs at a decode step (``snapkv_keep`` is None when S != T), so its
  outputs are wired straight to its inputs: its layer is append-only at decode and keeps the
  compiled backend's shared-slot, bucketed buffers. So do its packed Ada-KV forms (``evict_adakv``:
  ``heads="adaptive"``, ``pyramid=``; ``evict_adakv_shares``: ``heads="scores"``; ``PREFILL_ONLY_PACKED``): their
  layer's one shared buffer gets Hk slots per step (``static_cache.slots_per_step``) and its attention is
  ``packed_attention.packed_decode`` (the packed buffer read once, empty slots at position -1).

No fixed capacity, so left to the eager fallback (``static_fallback.runs_eagerly``): H2O with fraction
budgets (the kept count grows with the row length) and FastGen (special and punctuation tokens
accumulate and full heads keep everything: a data-dependent capacity; its frequent set is a top-k over
all tokens, so several may leave in one step). Refused, with the reason (``EvictionNotStatic``):
eviction on latent caches (one payload serves every KV head; the op keeps the union of the heads'
sets, and its outputs reach the latent states through views the fallback does not replay), the
packed Ada-KV caches of ``evict(rule="adaptive"|"scores")`` and ``h2o(heads="adaptive")``, and any layer whose
states are not the plain appended caches this rewrite expects.

StreamingLLM keys: the compiled backend lowers with the torch backend's ``streaming_rope_shift``
(``streaming_shift.py``), so a StreamingLLM layer caches post-RoPE keys in its slots and its attention is
``streaming_attention_static`` (the query rotated back by the evicted count for the sinks; no key is
re-rotated per step); ``rope_cache_index_static`` remains for layers that transform does not match.

Invariant tested (``tests/codegen/test_compiled_eviction.py``): on a ragged left-padded batch,
the compiled decode (Inductor, and the same graph eagerly) keeps the same position set per (row,
KV head) as the torch backend after every step, logits within 1e-4, same tokens, state shapes
constant once the budget is reached, one compile per capacity bucket.
"""

from __future__ import annotations

import operator

import torch

from ...ops import schema
from ...ops.eviction import (
    EVICT_ADAKV,
    EVICT_ADAKV_DECODE,
    EVICT_ADAKV_SCORED,
    EVICT_ADAKV_SHARES,
    EVICT_H2O,
    EVICT_OPS,
    EVICT_SNAPKV,
    EVICT_STREAMING,
    ROPE_CACHE_INDEX,
)
from ...ops.rope_index_ref import _rotate, rope_angles, rope_invert_reference
from .attention import attention_sdpa
from .cache_append import cache_append
from .eviction_slots import decode_colsum, position_rank
from .packed_attention import attention_packed, packed_decode
from .static_fallback import runs_eagerly
from .streaming_shift import invert_slots, streaming_attention

# the packed Ada-KV ops that compress once after prefill and return their inputs at decode (append only, like SnapKV)
PREFILL_ONLY_PACKED = (EVICT_ADAKV, EVICT_ADAKV_SHARES)


class EvictionNotStatic(ValueError):
    """An eviction layer whose decode-time state has no fixed capacity (the message says which and why)."""


# ----------------------------------------------------------------------------------- slot ops
def free_slot(k_pos: torch.Tensor) -> torch.Tensor:
    """[B, Hk] long: each head's first empty slot (k_pos < 0), from k_pos [B, Hk, C].

    The caller guarantees one exists (a head holds <= c < C tokens); the index is clamped to C - 1
    so a broken invariant overwrites a slot instead of writing out of bounds."""
    C = k_pos.shape[-1]
    ar = torch.arange(C, device=k_pos.device)
    return torch.where(k_pos < 0, ar, C).amin(dim=-1).clamp(max=C - 1)


def _heads(slot: torch.Tensor):
    """(row, head) index tensors [B, Hk] to pair with a per-head slot index ``slot`` [B, Hk]."""
    B, Hk = slot.shape
    return (torch.arange(B, device=slot.device)[:, None].expand(B, Hk), torch.arange(Hk, device=slot.device)[None].expand(B, Hk))


def head_slot_write(buf: torch.Tensor, new: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``buf[b, h, slot[b, h]] = new[b, h, 0]`` in place (buf [B, Hk, C, ...], new [B, Hk, 1, ...]); returns ``buf``.

    An ``index_put_``: Inductor re-inplaces it into the input buffer (a ``scatter_`` there became a
    copy of the whole buffer plus a copy back, seen in its output code)."""
    return buf.index_put_((*_heads(slot), slot), new[:, :, 0])


def _mark_empty(k_pos: torch.Tensor, over: torch.Tensor, victim: torch.Tensor) -> None:
    """k_pos[b, h, victim[b, h]] = -1 where ``over`` (in place; elsewhere the value is rewritten unchanged)."""
    b, h = _heads(victim)
    k_pos.index_put_((b, h, victim), torch.where(over, -1, k_pos[b, h, victim]))


def h2o_static(q, k, v, q_pos, k_pos, score, slot, scale, heavy_n: int, recent_n: int, key_bias=None):
    """``evict_h2o`` (token-count budgets) at a decode step on fixed slots; the new token is already in ``slot``.
    Updates ``score`` and ``k_pos`` in place. -> (k, v, k_pos, score)."""
    score.index_put_((*_heads(slot), slot), score.new_zeros(slot.shape))  # the new token's running score starts at 0
    score.add_(decode_colsum(q, k, q_pos, k_pos, scale, key_bias))
    length = q_pos.max(dim=1).values + 1
    cand = (k_pos >= 0) & (k_pos < (length - recent_n)[:, None, None])
    over = cand.sum(dim=-1) > heavy_n
    s = score.masked_fill(~cand, float("inf"))
    tie = cand & (s == s.amin(dim=-1, keepdim=True))
    victim = torch.where(tie, k_pos, -1).argmax(dim=-1)  # lowest score, latest position (positions are distinct)
    _mark_empty(k_pos, over, victim)
    return k, v, k_pos, score


def streaming_static(k, v, q_pos, k_pos, slot, sinks: int, window: int):
    """``evict_streaming`` at a decode step on fixed slots: the slot of position L - 1 - window is emptied. -> (k, v, k_pos)."""
    old = (q_pos.max(dim=1).values - window)[:, None, None]
    hit = (k_pos == old) & (old >= sinks)
    ar = torch.arange(k_pos.shape[-1], device=k_pos.device)
    _mark_empty(k_pos, hit.any(dim=-1), torch.where(hit, ar, 0).amax(dim=-1))
    return k, v, k_pos


def streaming_attention_static(q, k, v, q_pos, k_pos, scale, window, key_bias, attn_sinks, pos, inv_freq, scaling,
                               keep_sinks: int, keep_window: int):
    """``streaming_shift.streaming_attention`` at a decode step on fixed slots (keys cached post-RoPE at their positions).

    The no-re-rotation path reads positions only, so slot order does not matter and it is called as it is; the
    other path (a native sliding window or attention-sink argument on the layer: Gemma 3's local layers) ranks
    the slots by position and rotates the query by its head's valid count - 1 (``rope_cache_index_static``), since
    here the new token sits in its head's first empty slot, not the last one."""
    if q.shape[2] == 1 and k_pos.dim() == 3 and not window and not attn_sinks:
        return streaming_attention(q, k, v, q_pos, k_pos, scale, window, key_bias, attn_sinks, pos, inv_freq, scaling,
                                   keep_sinks, keep_window)
    q_rot, k_rot = rope_cache_index_static(rope_invert_reference(q, pos, inv_freq, scaling),
                                           invert_slots(k, k_pos, inv_freq, scaling), k_pos, inv_freq, scaling)
    return attention_sdpa(q_rot, k_rot, v, q_pos, k_pos, scale, window, key_bias, attn_sinks)


def rope_cache_index_static(q, k, k_pos, inv_freq, scaling: float):
    """``rope_cache_index`` on unordered slots at a decode step: keys by position rank, the query (the
    head's latest position) by its head's valid count - 1. -> (q_rot, k_rot)."""
    H, Hk = q.shape[1], k.shape[1]
    ck, sk = rope_angles(position_rank(k_pos), inv_freq)
    q_idx = ((k_pos >= 0).sum(dim=-1, keepdim=True) - 1).clamp(min=0).repeat_interleave(H // Hk, dim=1)  # [B, H, 1]
    cq, sq = rope_angles(q_idx, inv_freq)
    return _rotate(q, cq, sq, scaling), _rotate(k, ck, sk, scaling)


# ----------------------------------------------------------------------------------- the graph rewrite
def _reason(op, node) -> str | None:
    """Why an eviction op has no fixed decode capacity, or None."""
    name = op.name().split("::")[-1].removeprefix("evict_")
    layer = node.meta.get("graphwright", {}).get("layer")
    where = f"{name} (layer {layer})" if layer is not None else name
    if op in (EVICT_ADAKV_SCORED, EVICT_ADAKV_DECODE):
        return (f"{where}: evict(rule='adaptive' or 'scores') and h2o(heads='adaptive') on a packed per-layer cache "
                "(ragged heads) have no static decode translation; use the torch backend (snapkv's packed forms, "
                "heads='adaptive'/'scores' or pyramid=, compress once, then append, and compile)")
    if op not in (EVICT_H2O, EVICT_STREAMING, EVICT_SNAPKV, *PREFILL_ONLY_PACKED):
        return f"{where}: no static decode translation and no eager fallback (static_fallback.EAGER_OPS)"
    return None


def _state_layout(graph: torch.fx.Graph, num_state: int):
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    states = placeholders[3:3 + num_state]
    out = next(n for n in graph.nodes if n.op == "output")
    return states, out, list(out.args[0])[1:1 + num_state]


def _appended_state(node, states, specs, where: str):
    """(state index, new entries) of ``cache_append(state input, new, 2)`` on a per-head cache; EvictionNotStatic otherwise."""
    if isinstance(node, torch.fx.Node) and node.target is cache_append and node.args[0] in states:
        cache, new, dim = node.args
        spec = specs[states.index(cache)]
        if spec.seq_dim == 2 and dim % len(spec.shape) == 2:
            return states.index(cache), new
    raise EvictionNotStatic(f"{where}: its cache is not a per-head state input appended along the slot dim (eviction on a "
                            "latent cache, e.g. lowrank_kv + an eviction policy, where one payload serves every KV head, "
                            "or a cache that another op rewrote)")


class _Args:
    """Arguments of a lowered eviction node read by the name of the original op's schema (the lowered
    node calls a backend function; the runtime graph's node of the same name still calls the op)."""

    def __init__(self, node, orig):
        self.node, self.orig = node, orig
        self.names = schema.arg_names(orig.target)

    def __getitem__(self, name):
        i = self.names.index(name)
        if i < len(self.node.args):
            return self.node.args[i]
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        return schema.get(self.orig, name)  # a default (a constant, never a node)


def _bypass(node) -> None:
    """Wire each ``getitem(node, i)`` to the node's i-th cache input (k, v, k_pos) and drop the node."""
    args = _Args(node, node.meta["_orig"])
    inputs = (args["k"], args["v"], args["k_pos"])
    for user in list(node.users):
        user.replace_all_uses_with(inputs[user.args[1]])
        node.graph.erase_node(user)
    node.graph.erase_node(node)


def eviction_decode_rewrite(graph: torch.fx.Graph, orig_graph: torch.fx.Graph, specs) -> dict:
    """Rewrite the lowered decode ``graph`` in place (see the module docstring); ``orig_graph`` is the runtime
    step graph it was lowered from (same node names; its op nodes give the schema).

    Returns ``{state index: {"limit": c + 1, "fill": value of an empty slot}}`` for every state of an
    evicting layer (their capacity never needs more than ``c + 1`` slots). Raises ``EvictionNotStatic``."""
    orig = {n.name: n for n in orig_graph.nodes}
    states, _, outputs = _state_layout(graph, len(specs))
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    plan, ropes, shifted = {}, [], []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is streaming_attention:  # streaming_rope_shift's post-RoPE layers
            shifted.append(node)
            continue
        o = orig.get(node.name)
        if node.op != "call_function" or o is None or o.op != "call_function":
            continue
        if o.target is ROPE_CACHE_INDEX:
            ropes.append(node)
            continue
        if o.target not in EVICT_OPS or runs_eagerly(o):  # static_fallback.py runs them after the step
            continue
        why = _reason(o.target, o)
        if why:
            raise EvictionNotStatic(why)
        node.meta["_orig"] = o
        if o.target is EVICT_SNAPKV or o.target in PREFILL_ONLY_PACKED:  # they return their inputs at decode
            _bypass(node)
            continue
        plan.update(_static_layer(node, o, states, specs, outputs, last_input))
    for node in list(graph.nodes):  # a packed cache's attention: the decode form only (no wide view to fall back on)
        if node.op == "call_function" and node.target is attention_packed:
            _packed_decode_only(node, orig[node.name])
    for node in ropes:  # StreamingLLM's rotation: only over the slots this rewrite made
        k_pos = _Args(node, orig[node.name])["k_pos"]
        if k_pos.target is not head_slot_write:
            raise EvictionNotStatic(f"{node.name}: rope_cache_index over a cache that is not a static eviction layer's slots")
        node.target = rope_cache_index_static
    for node in shifted:
        if node.args[1].target is not head_slot_write:
            raise EvictionNotStatic(f"{node.name}: streaming attention over a cache that is not a static eviction layer's slots")
        node.target = streaming_attention_static
    graph.lint()
    return plan


def _packed_decode_only(node, o) -> None:
    """``attention_packed`` -> ``packed_decode`` (one query per head over the packed slots; its cache states then feed
    only their appends, as static caches need); EvictionNotStatic when the layer has a window, sinks or key bias."""
    args = _Args(node, o)
    if args["window"] or args["sinks"] or args["key_bias"] is not None:
        raise EvictionNotStatic(f"{node.name}: attention over a packed cache with a window, sinks or key bias has no "
                                "one-query decode form; use the torch backend")
    node.target, node.args, node.kwargs = packed_decode, tuple(args[n] for n in ("q", "k", "v", "q_pos", "k_pos", "scale")), {}


def _static_layer(node, o, states, specs, outputs, last_input) -> dict:
    """Rewrite one H2O / StreamingLLM layer; -> its part of the plan."""
    args = _Args(node, o)
    where = f"{o.target.name()} ({node.name})"
    is_h2o = o.target is EVICT_H2O
    idx = {}
    news = {}
    for name in ("k", "v", "k_pos"):
        idx[name], news[name] = _appended_state(args[name], states, specs, where)
    k_spec, v_spec, p_spec = (specs[idx[n]] for n in ("k", "v", "k_pos"))
    if len(p_spec.shape) != 3 or not k_spec.shape[1] == v_spec.shape[1] == p_spec.shape[1]:
        raise EvictionNotStatic(f"{where}: k, v and key positions do not share their KV heads (a latent layer's one-head payload)")
    if is_h2o:
        if args["score"] not in states:
            raise EvictionNotStatic(f"{where}: its running score is not a state input")
        idx["score"] = states.index(args["score"])
    order = ("k", "v", "k_pos", "score") if is_h2o else ("k", "v", "k_pos")
    for out_i, name in enumerate(order):  # each output must be the same state's next value
        users = [u for u in node.users if u.target is operator.getitem and u.args[1] == out_i]
        if len(users) != 1 or outputs[idx[name]] is not users[0]:
            raise EvictionNotStatic(f"{where}: its output {out_i} ({name}) is not the next value of the state it read")
    k_pos_in = states[idx["k_pos"]]
    with node.graph.inserting_after(last_input):  # read before any slot write
        slot = node.graph.call_function(free_slot, (k_pos_in,))
    for name in ("k", "v", "k_pos"):
        app = args[name]
        app.target, app.args, app.kwargs = head_slot_write, (states[idx[name]], news[name], slot), {}
    if is_h2o:
        heavy, recent = int(args["heavy_n"]), int(args["recent_n"])
        cap = heavy + recent
        new_args = (args["q"], args["k"], args["v"], args["q_pos"], args["k_pos"], args["score"], slot, args["scale"],
                    heavy, recent, args["key_bias"])
    else:
        sinks, window = int(args["sinks"]), int(args["window"])
        cap = sinks + window
        new_args = (args["k"], args["v"], args["q_pos"], args["k_pos"], slot, sinks, window)
    node.target, node.args = (h2o_static if is_h2o else streaming_static), new_args
    node.kwargs = {}
    del node.meta["_orig"]
    return {i: {"limit": cap + 1, "fill": -1 if name == "k_pos" else 0} for name, i in idx.items()}
