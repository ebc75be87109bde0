"""In-graph slot eviction for the ONNX decode step: every per-head decode policy runs inside ``decode.onnx``.

H2O, StreamingLLM and FastGen here; ``evict(score=h2o|knorm|keydiff|tova, when="decode")``, Scissorhands
and Keyformer in ``decode_policies.py`` (the same slot scheme, the victim rules of the torch backend's
``codegen/torch/policy_slots.py``; Keyformer's Gumbel noise is a graph input the runtime draws,
``gm.meta["host_inputs"]``).

The prefill graph (``model.onnx``) still cuts every eviction op out (``split.py``): at a prompt
step the kept count is data dependent. A decode step (T = 1) of a token-count budget is not:
``decode_graph`` rewrites a copy of the step graph so that each layer's cache is a fixed-capacity
set of slots, the algorithm of the torch backend's ``codegen/torch/eviction_slots.py`` written with
out-of-place tensor ops that ``torch.export`` and the ONNX exporter translate (ArgMax, ReduceMin,
ScatterElements, Where, MatMul, Softmax), so one decode step is one ONNX Runtime session run:

* the runtime pads an evicting layer's state to its capacity ``c`` once, after the prefill (k_pos
  -1 = empty slot, zeros elsewhere; ``pad_to_capacity``), so the decode graph's input holds S = c
  slots and ``cache_append`` puts the new token at slot S;
* per (row, KV head) the new token's row (k, v, position, score) is written (ScatterElements) into
  the victim's slot when the head is over budget, else into its first empty slot; the output is
  the first S slots, so the decode state's shape never changes. A head under budget holds at most
  c tokens with the new one, so it has an empty slot among the first S = c: nothing is lost;
* H2O: the running score (the state) gets this step's attention probabilities (fp32 softmax of
  q.k over visible slots, mean over the g query heads of a KV head) added in the graph; the victim
  is the argmin over the non-recent slots, ties to the latest position (as the reference's top-k
  and the torch slots). StreamingLLM: the victim is the slot holding position ``L - 1 - window``
  (no scoring). A dense StreamingLLM layer's keys are cached rotated at their absolute positions
  and its attention rotates only the query (``streaming_shift.py``, applied before this rewrite; then
  ``decode_rows.SINK_KEYS``: only the sinks' keys, forward, under the fused Attention);
  any other ``rope_cache_index`` rotates by each slot's rank by position among the valid slots (the
  cache is not in position order any more), counted by comparisons (S x S per head);
* SnapKV appends at decode (its reference returns its inputs when T > 1 is not the case), so its op
  becomes the identity in the decode graph: nothing is cut.
* node count (each node is an ORT kernel launch on a tiny tensor; at a 256 prompt they cost more than
  the attention they shorten, ``bench/profile_onnx_decode.py``): where the new token can never leave
  (H2O with ``recent >= 1``, StreamingLLM with ``window >= 1``) ``place_at`` scatters its row straight
  into the first S slots with an Unsqueeze + Expand index of constant shape; the running score's new
  slot is a ``Pad``; H2O's colsum is one 4-D MatMul (``export_colsum``); StreamingLLM's slot is one
  ArgMin over the positions with the hit's set to -2 (``streaming_slot``): the hit, else the first empty slot
  (else the earliest position: a state a consistent head never reaches).

Growing capacities (``"grow"`` in ``graphwright.json["decode"]["capacity"]``): where the kept count
has no constant bound, the layer's slots grow on the host, between session runs, from data the
runtime already holds: before each decode step ``pad_to_capacity`` makes S >= 1 + the largest kept
count in the layer's k_pos state (a count over a [B, Hk, S] int tensor on CPU), rounded up to
``GROW_SLACK`` slots, so every head has an empty slot for the new token and the graph stays
shape-generic (the decode graph's S is dynamic). Widths never shrink; one copy of the layer's cache
per ``GROW_SLACK`` slots gained. Used by:

* fraction budgets (``h2o(heavy=0.25, recent=0.25)``): the victim rule above with the budgets
  computed in the graph per row (``eviction_ref.budget``: double Floor of frac * L);
* latent caches (``lowrank_kv`` + H2O / StreamingLLM, ``decode_latent.py``): the heads' union on one
  set of slots (StreamingLLM's union is bounded by sinks + window, so it keeps a fixed capacity);
* FastGen (``decode_latent.fastgen_decode``): each head's policy mask over its slots, several
  tokens may leave per step, the frequent top-k ranked by position ties (ONNX TopK); its policy
  state [B, Hk, 1] is a fixed capacity of 1.

* the scored policies (``decode_policies.py``): fraction budgets of ``evict(score=...)`` and
  Keyformer's prompt-fraction budget (``kv=0.5``, frozen per row at its prompt length).

Per-head state (FastGen's ``policy``, Keyformer's ``meta``, Scissorhands' ``step``: ``EvictionPolicy.head_state``)
keeps its width: capacity ``{"slots": width, "fill": 0}`` (a cache that starts at a decode step gets zeros).

Left split at decode (``split.py`` records, reasons in ``graphwright.json["decode"]["split"]``):
FastGen and the scored policies on a latent cache, ``evict(when=every|overflow|block|prefill)``,
ChunkKV, ``rule="pyramid"``, the prefill scorers, eviction ops with no decode translation (the record names them), and any
op whose outputs reach the state through view ops other than a latent layer's payload slices. The prompt steps (``model.onnx``)
evict in the graph where ``prompt_slots.py`` has a translation and cut the other ops out.

Invariants tested (``tests/onnx/test_onnx_eviction_slots.py``, ``tests/onnx/test_onnx_decode_dynamic.py``,
``tests/onnx/test_onnx_policy_decode.py`` for ``decode_policies.py``):
the in-graph decode keeps the same position sets per (row, KV head) as the torch backend's slots
and as the compacting references, after every step with eviction at every step (tiny Llama, batch
2 left-padded, 60 decode steps), logits within 1e-4; fixed capacities: state shapes constant once
the budget is reached; growing ones: widths change only in ``GROW_SLACK`` steps; no decode split
records; I/O binding gives ``session.run``'s tokens.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F

from ...ops import schema
from ...ops.eviction import EVICT_FASTGEN, EVICT_H2O, EVICT_OPS, EVICT_SNAPKV, EVICT_STREAMING, POLICIES, ROPE_CACHE_INDEX
from ...ops.eviction_ref import budget
from ...ops.rope_index_ref import _rotate, rope_angles
from ..torch.step_memo import step_info
from .decode_latent import fastgen_decode, h2o_latent_decode, streaming_latent_decode


def _first(mask: torch.Tensor) -> torch.Tensor:
    """[B, Hk] index of the first True along the last dim (0 when none)."""
    return mask.to(torch.int32).argmax(dim=-1)


def first_empty(k_pos: torch.Tensor) -> torch.Tensor:
    """[B, Hk] the first empty slot among 0..S-1 of ``k_pos`` [B, Hk, S+1] (0 when none; slot S, the new token,
    is not looked at: a padding row's new token has position -1)."""
    return _first(k_pos[..., :k_pos.shape[2] - 1] < 0)


def write_rows(olds, news, j):
    """Each new row [B, Hk, 1, ...] written into slot ``j`` [B, Hk] (or [B, Hk, 1]: an ArgMax/ArgMin with keepdim,
    one Unsqueeze fewer) of its old state [B, Hk, S, ...] (out of place): one ScatterElements per tensor, the
    index an Unsqueeze (+ one Expand per trailing shape)."""
    out, index = [], {}
    for x, row in zip(olds, news):
        trail = tuple(x.shape[3:])
        if trail not in index:
            idx = j if j.dim() == 3 else j[:, :, None]
            for _ in trail:
                idx = idx[..., None]
            index[trail] = idx.expand(-1, -1, -1, *trail) if trail else idx
        out.append(x.scatter(2, index[trail], row))
    return tuple(out)


def place_at(tensors, j):
    """Write slot S (the new token) of each tensor into slot ``j`` [B, Hk] of its first S slots (out of place);
    ``j`` < S (the caller knows the new token never leaves: ``place`` takes the general case).

    Exported as one ScatterElements into the first S slots per tensor, its index an Unsqueeze + Expand
    to a constant shape: no Shape/Concat chain for the index, no Slice of a scattered S + 1 copy."""
    S = tensors[0].shape[2] - 1
    return write_rows([x[:, :, :S] for x in tensors], [x[:, :, S:] for x in tensors], j)


def place(tensors, k_pos, over, victim):
    """Write slot S (the new token) into the victim's slot where ``over``, else into the first empty
    slot of 0..S-1; return the first S slots of each tensor (out of place).

    ``tensors``: k, v [B, Hk, S+1, D] and per-slot state [B, Hk, S+1]; ``victim`` may be S (the new
    token itself leaves). Requires S >= the capacity (``pad_to_capacity``)."""
    B, Hk, S1 = k_pos.shape
    S = S1 - 1
    j = torch.where(over, victim, first_empty(k_pos))
    out = []
    for x in tensors:
        idx = j.view(B, Hk, 1, *([1] * (x.dim() - 3))).expand(*x.shape[:2], 1, *x.shape[3:])
        out.append(x.scatter(2, idx, x[:, :, S:]).narrow(2, 0, S))
    return tuple(out)


def _budget(count: int, frac: float, length: torch.Tensor) -> torch.Tensor:
    """[B] ``eviction_ref.budget`` (count + floor(frac * L)); a token count stays a constant in the graph."""
    return budget(count, frac, length) if frac else torch.full_like(length, count)


def export_colsum(q, k, q_pos, k_pos, scale, key_bias=None) -> torch.Tensor:
    """``eviction_slots.decode_colsum`` written for export: [B, Hk, S] fp32 attention each slot received at a
    T = 1 step, mean over the g query heads of its KV head (same fp32 scores, ``finfo.min`` mask, fp32
    softmax, padding-row factor). One 4-D MatMul [B, Hk, g, D] x [B, Hk, D, S] instead of the torch
    backend's bmm over B * Hk heads, whose folded shapes the exporter builds with Shape/Mul/Concat nodes."""
    info = step_info(q_pos)
    return slot_probs(q, k, (k_pos >= 0) & (k_pos <= info.q_lift), scale, key_bias).mean(dim=2) * info.real


def slot_probs(q, k, visible, scale, key_bias=None) -> torch.Tensor:
    """[B, Hk, g, S] fp32 attention probabilities of one decode query per row over ``k`` [B, Hk, S, D] where
    ``visible`` [B, Hk, S] (``attention_reference``'s fp32 scores, ``finfo.min`` mask, fp32 softmax)."""
    B, H, _, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    s = torch.matmul(q.float().reshape(B, Hk, g, D), k.float().transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias.float().reshape(B, Hk, g, S)
    return torch.softmax(torch.where(visible[:, :, None], s, torch.finfo(torch.float32).min), dim=-1)


def h2o_decode(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """``evict_h2o`` at a decode step over S >= capacity slots (budgets computed per row from its length). -> (k, v, k_pos, score)."""
    score = F.pad(score, (0, 1)) + export_colsum(q, k, q_pos, k_pos, scale, key_bias)  # the new token's slot starts at 0
    length = q_pos.max(dim=1).values + 1
    cand = (k_pos >= 0) & (k_pos < (length - _budget(recent_n, recent_f, length))[:, None, None])
    over = cand.sum(dim=-1) > _budget(heavy_n, heavy_f, length)[:, None]
    s = torch.where(cand, score, float("inf"))
    tie = cand & (s == s.amin(dim=-1, keepdim=True))
    victim = torch.where(tie, k_pos, -1).argmax(dim=-1)  # lowest score, latest position
    if recent_n >= 1:  # the new token (position L - 1) is recent, never a candidate: the victim is one of 0..S-1
        return place_at((k, v, k_pos, score), torch.where(over, victim, first_empty(k_pos)))
    return place((k, v, k_pos, score), k_pos, over, victim)


def streaming_decode(k, v, q_pos, k_pos, sinks, window):
    """``evict_streaming`` at a decode step over S = capacity slots: the slot of position L-1-window leaves."""
    old = (q_pos.max(dim=1).values - window)[:, None, None]
    if window < 1:  # the leaving position may be the new token's own
        hit = (k_pos == old) & (old >= sinks)
        return place((k, v, k_pos), k_pos, hit.any(dim=-1), _first(hit))
    # window >= 1: the leaving position is an older token's (at most one slot holds it)
    return place_at((k, v, k_pos), streaming_slot(k_pos[..., :k_pos.shape[2] - 1], q_pos, sinks, window))


def streaming_slot(kp_old: torch.Tensor, q_pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """[B, Hk, 1] the slot of ``kp_old`` [B, Hk, S] that a StreamingLLM step with ``window >= 1`` writes the new
    token into: the slot of position L - 1 - window when that position leaves (>= sinks; at most one slot holds
    it), else the first empty slot (k_pos -1), else the slot of the earliest position (a head holds at most c =
    sinks + window tokens with the new one, so a consistent state never gets here: it always has the leaving
    position or an empty slot).

    One ArgMin (keepdim) over the positions with the hit's set to -2 (below the empty slots' -1); the step's
    target ``old`` is -3 (matching no slot) when nothing leaves: Equal, Where, ArgMin per layer, the target's
    arithmetic shared by every layer."""
    old = q_pos.max(dim=1).values - window
    old = torch.where(old >= sinks, old, -3)[:, None, None]
    return torch.where(kp_old == old, -2, kp_old).argmin(dim=-1, keepdim=True)


def snapkv_decode(q, k, v, q_pos, k_pos, *args):
    """``evict_snapkv`` at a decode step: the appended cache as it is."""
    return k, v, k_pos


def position_rank(k_pos: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S] long: each valid slot's rank by position among its head's valid slots, as a count of
    smaller keys (empty slots rank after every valid one)."""
    key = torch.where(k_pos >= 0, k_pos, torch.full_like(k_pos, torch.iinfo(torch.int64).max))
    return (key[..., None, :] < key[..., :, None]).sum(dim=-1)


def rope_cache_index_decode(q, k, k_pos, inv_freq, scaling: float):
    """``rope_cache_index`` with the index taken by position rank; the query is the last slot."""
    H, Hk, S = q.shape[1], k.shape[1], k.shape[2]
    idx = position_rank(k_pos)
    ck, sk = rope_angles(idx, inv_freq)
    cq, sq = rope_angles(idx[..., S - 1:].repeat_interleave(H // Hk, dim=1), inv_freq)
    return _rotate(q, cq, sq, scaling), _rotate(k, ck, sk, scaling)


FASTGEN_REASON = "FastGen on a latent cache: one payload serves every KV head and the heads follow different policies"
LATENT_REASON = "a latent cache: one payload serves every KV head (the reference keeps the heads' union), no slot form yet"
VIEW_REASON = "the op's outputs reach the state through view ops other than a latent layer's payload"
ROWS = True  # decode_rows.rows: H2O / StreamingLLM layers on (old slots, new row), H2O with its attention (False: A/B, tests)
GROW_SLACK = 16  # dynamic capacities grow to a multiple of this many slots (one copy of the cache per 16 slots gained)


def _translation(node, latent: bool):
    """(decode function, fixed slot count or None when it grows with the kept count, None) or (None, None, why)."""
    if node.target is EVICT_STREAMING:
        c = int(schema.get(node, "sinks")) + int(schema.get(node, "window"))
        return (streaming_latent_decode if latent else streaming_decode), c, None
    if node.target is EVICT_H2O:
        if latent:
            return h2o_latent_decode, None, None
        if schema.get(node, "heavy_f") or schema.get(node, "recent_f"):
            return h2o_decode, None, None
        return h2o_decode, int(schema.get(node, "heavy_n")) + int(schema.get(node, "recent_n")), None
    if node.target is EVICT_FASTGEN and not latent:
        return fastgen_decode, None, None
    if node.target is EVICT_FASTGEN:
        return None, None, FASTGEN_REASON
    from .decode_policies import translation  # it imports ``place`` from here

    found = translation(node)
    if found is not None and (found[2] is not None or not latent):
        return found
    if found is not None:
        return None, None, LATENT_REASON
    return None, None, f"{node.target.name()} has no decode translation"


def head_state_widths(node) -> dict:
    """{op output index: width} of the eviction op's per-head state (``EvictionPolicy.head_state``: FastGen's
    ``policy``, Keyformer's ``meta``, Scissorhands' ``step``), which keeps its width in the decode graph."""
    policy = POLICIES.get(node.target.name().split("::evict_", 1)[-1])
    if policy is None:
        return {}
    first = 3 + len(policy.slot_state)
    return {first + i: s.width for i, s in enumerate(policy.head_state)}


def _one_head_set(names: dict, specs: dict) -> bool:
    """The op's k, v (outputs 0, 1) and k_pos (output 2) states share their KV heads, k_pos [B, Hk, S]
    (not a latent layer's one-head payload)."""
    if not all(i in names for i in (0, 1, 2)):
        return False
    k, v, kp = (specs[names[i]].shape for i in (0, 1, 2))
    return len(kp) == 3 and len(k) == len(v) == 4 and k[1] == v[1] == kp[1]


def _state_outputs(node, out_node, state_names):
    """{op output index: state name} for the outputs that go straight to the state, and whether every one does."""
    outs = list(out_node.args[0])
    names, direct = {}, True
    for user in node.users:
        if user.target is not operator.getitem or set(user.users) != {out_node}:
            direct = False
            continue
        _, index = user.args  # operator.getitem(op node, output index)
        for j, o in enumerate(outs):
            if o is user:
                names[index] = state_names[j - 1]
    return names, direct


def outputs_of(node, state_names: list, name: str):
    """The value the step graph returns as state ``name``."""
    out = next(n for n in node.graph.nodes if n.op == "output")
    return out.args[0][1 + state_names.index(name)]


def _from_node(value, node, depth: int = 6) -> bool:
    """Whether ``value`` is ``node``'s output reached through single-input ops (getitem, select, slice, views)."""
    for _ in range(depth):
        if not isinstance(value, torch.fx.Node):
            return False
        if value is node:
            return True
        value = value.args[0] if value.args else None
    return False


def _latent_states(node, names: dict, specs: dict, state_names: list):
    """The states of a latent eviction layer ({name: is k_pos}), or None when the layout is not the one
    ``decode_latent`` expects: k_pos straight to the state, the layer's kv states one-head payloads
    [B, S, r] reached through view ops, its other states per-head [B, Hk, S] side state."""
    layer = node.meta.get("graphwright", {}).get("layer")
    if 2 not in names or layer is None:
        return None
    group = [n for n in state_names if specs[n].layer == layer and specs[n].kind in ("kv", "positions")]
    # a latent cache of the same layer that this node does not evict (duo + lowrank_kv: the retrieval heads') is not its state
    group = [n for n in group if specs[n].kind != "kv" or _from_node(outputs_of(node, state_names, n), node)]
    kv = [n for n in group if specs[n].kind == "kv"]
    if names[2] not in group or not kv or any(len(specs[n].shape) != 3 or specs[n].seq_dim != 1 or n in names.values() for n in kv) \
            or any(len(specs[n].shape) != 3 or specs[n].seq_dim != 2 for n in group if n not in kv):
        return None
    return {n: n == names[2] for n in group}


def decode_graph(gm: torch.fx.GraphModule, state_specs: list):
    """A copy of ``gm`` for T = 1 steps with slot eviction in the graph.

    Returns ``(gm, capacity, in_graph, left)``: ``in_graph`` lists the eviction ops (one per layer)
    now computed in the graph, ``left`` the ones still split at decode ``{"op", "layer", "reason"}``;
    ``capacity`` maps each state of an in-graph evicting layer to ``{"slots": c, "fill": v}`` (the
    runtime pads it to c slots of v after the prefill) and, where the kept count is not bounded by a
    constant (fraction budgets, latent unions), ``"grow": k_pos state`` (``pad_to_capacity``). The
    eviction nodes the module docstring leaves split stay as they are (``split`` cuts them)."""
    from .decode_policies import host_inputs  # it imports ``place`` from here

    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    state_names, specs = [s.name for s in state_specs], {s.name: s for s in state_specs}
    capacity, in_graph, left, host = {}, [], [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is EVICT_SNAPKV:
            in_graph.append(node.target.name())
            node.target = snapkv_decode
            continue
        if node.target is ROPE_CACHE_INDEX:
            node.target = rope_cache_index_decode
            continue
        if node.target not in EVICT_OPS:
            continue
        names, direct = _state_outputs(node, out_node, state_names)
        group = None if direct and _one_head_set(names, specs) else _latent_states(node, names, specs, state_names)
        fn, c, why = _translation(node, latent=group is not None)
        if why is None and group is None and not (direct and _one_head_set(names, specs)):
            why = VIEW_REASON
        if why is not None:
            left.append({"op": node.target.name(), "layer": node.meta.get("graphwright", {}).get("layer"), "reason": why})
            continue
        in_graph.append(node.target.name())
        host += host_inputs(gm, node, names)  # decode_policies.py: Keyformer's Gumbel noise, drawn by the runtime
        # per-head state (FastGen's policy [B, Hk, 1], Keyformer's meta [B, Hk, 3], Scissorhands' step): its own width
        fixed = {names.pop(i): {"slots": w, "fill": 0} for i, w in head_state_widths(node).items() if i in names}
        node.target = fn
        group = group if group is not None else {name: i == 2 for i, name in names.items()}
        kp = next(n for n, is_kp in group.items() if is_kp)
        capacity.update({name: {"slots": c or 1, "fill": -1 if is_kp else 0, **({} if c else {"grow": kp})}
                         for name, is_kp in group.items()})
        capacity.update(fixed)
    gm.meta["host_inputs"] = host
    if ROWS:
        from .decode_rows import rows  # it imports the functions it replaces from here

        rows(gm, state_specs)
    gm.graph.lint()
    gm.recompile()
    return gm, capacity, in_graph, left


def slot_targets(state: list, names: list, seq_dims: list, capacity: dict) -> dict:
    """{state name: slot count} before a decode step: a fixed capacity's ``slots``; a growing one's
    (``grow``: its k_pos state) current width, or, when that is below 1 + its largest kept count (then a
    head might find no empty slot for the new token), that count rounded up to ``GROW_SLACK``."""
    width, need = {}, {}
    for name, t, dim in zip(names, state, seq_dims):
        cap = capacity.get(name)
        if cap is not None and cap.get("grow") == name and name not in need:
            need[name] = int((t >= 0).sum(dim=dim).max()) + 1 if t.numel() else 1
            width[name] = t.shape[dim]
    out = {}
    for name, cap in capacity.items():
        grow = cap.get("grow")
        if grow is None:
            out[name] = cap["slots"]
            continue
        n = max(cap["slots"], need.get(grow, 1))
        out[name] = width.get(grow, 0) if width.get(grow, 0) >= n else -(-n // GROW_SLACK) * GROW_SLACK
    return out


def pad_to_capacity(state: list, names: list, seq_dims: list, capacity: dict) -> list:
    """Grow each capacity state to its slot count (``slot_targets``) along its seq dim (``fill``: -1 positions, 0 else)."""
    target = slot_targets(state, names, seq_dims, capacity)
    out = []
    for t, name, dim in zip(state, names, seq_dims):
        cap = capacity.get(name)
        if cap is None or t.shape[dim] >= target[name]:
            out.append(t)
            continue
        pad_shape = list(t.shape)
        pad_shape[dim] = target[name] - t.shape[dim]
        out.append(torch.cat([t, torch.full(pad_shape, cap["fill"], dtype=t.dtype, device=t.device)], dim))
    return out
