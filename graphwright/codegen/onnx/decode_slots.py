"""In-graph slot eviction for the ONNX decode step: H2O and StreamingLLM run inside ``decode.onnx``.

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
  (no scoring), and ``rope_cache_index`` rotates by each slot's rank by position among the valid
  slots (the cache is not in position order any more), counted by comparisons (S x S per head);
* SnapKV appends at decode (its reference returns its inputs when T > 1 is not the case), so its op
  becomes the identity in the decode graph: nothing is cut.

Policies that stay split at decode (``split.py`` records in ``graphwright.json["decode"]``):

* fraction budgets (``heavy=0.1``...): the kept count grows with the row length, so there is no
  fixed capacity and the state would have to grow on a data-dependent condition;
* FastGen: its frequent set is a top-k over *all* tokens, protected ones included, so several
  tokens may leave in one step (the torch backend compacts it too);
* latent caches (``lowrank_kv`` + an eviction policy): one payload serves every KV head, the op
  keeps the union of the heads' sets;
* an op whose outputs reach the state through view ops (``derived`` records).

Invariants tested (``tests/onnx/test_onnx_eviction_slots.py``): the in-graph decode keeps the same
position sets per (row, KV head) as the torch backend's slots and as the compacting references,
after every step with eviction at every step (tiny Llama, batch 2 left-padded), logits within
1e-4, state shapes constant once the budget is reached, no decode split records.
"""

from __future__ import annotations

import copy
import operator

import torch

from ...ops import schema
from ...ops.eviction import EVICT_FASTGEN, EVICT_H2O, EVICT_OPS, EVICT_SNAPKV, EVICT_STREAMING, ROPE_CACHE_INDEX
from ...ops.rope_index_ref import _rotate, rope_angles
from ..torch.eviction_slots import decode_colsum


def _first(mask: torch.Tensor) -> torch.Tensor:
    """[B, Hk] index of the first True along the last dim (0 when none)."""
    return mask.to(torch.int32).argmax(dim=-1)


def place(tensors, k_pos, over, victim):
    """Write slot S (the new token) into the victim's slot where ``over``, else into the first empty
    slot of 0..S-1; return the first S slots of each tensor (out of place).

    ``tensors``: k, v [B, Hk, S+1, D] and per-slot state [B, Hk, S+1]; ``victim`` may be S (the new
    token itself leaves). Requires S >= the capacity (``pad_to_capacity``)."""
    B, Hk, S1 = k_pos.shape
    S = S1 - 1
    empty = k_pos[..., :S] < 0
    j = torch.where(over, victim, _first(empty))
    out = []
    for x in tensors:
        idx = j.view(B, Hk, 1, *([1] * (x.dim() - 3))).expand(*x.shape[:2], 1, *x.shape[3:])
        out.append(x.scatter(2, idx, x[:, :, S:]).narrow(2, 0, S))
    return tuple(out)


def h2o_decode(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """``evict_h2o`` at a decode step over S = capacity slots (token-count budgets). -> (k, v, k_pos, score)."""
    B, Hk, _ = k_pos.shape
    score = torch.cat([score, score.new_zeros(B, Hk, 1)], 2) + decode_colsum(q, k, q_pos, k_pos, scale, key_bias)
    length = q_pos.max(dim=1).values + 1
    cand = (k_pos >= 0) & (k_pos < (length - recent_n)[:, None, None])
    over = cand.sum(dim=-1) > heavy_n
    s = score.masked_fill(~cand, float("inf"))
    tie = cand & (s == s.min(dim=-1, keepdim=True).values)
    victim = torch.where(tie, k_pos, torch.full_like(k_pos, -1)).argmax(dim=-1)  # lowest score, latest position
    return place((k, v, k_pos, score), k_pos, over, victim)


def streaming_decode(k, v, q_pos, k_pos, sinks, window):
    """``evict_streaming`` at a decode step over S = capacity slots: the slot of position L-1-window leaves."""
    old = (q_pos.max(dim=1).values - window)[:, None, None]
    hit = (k_pos == old) & (old >= sinks)
    return place((k, v, k_pos), k_pos, hit.any(dim=-1), _first(hit))


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


FASTGEN_REASON = "FastGen's frequent set is a top-k over all tokens, so several tokens may leave in one step"
FRACTION_REASON = "fraction budgets: the kept count grows with the row length, so there is no fixed slot capacity"
LATENT_REASON = "latent cache: one payload serves every KV head (the op keeps the union of the heads' sets)"
VIEW_REASON = "the op's outputs reach the state through view ops (a latent layer's shared payload sliced into c_k, c_v)"


def _capacity(node):
    """(fixed slot count of an eviction node at decode, None) or (None, why it stays split)."""
    if node.target is EVICT_STREAMING:
        return int(schema.get(node, "sinks")) + int(schema.get(node, "window")), None
    if node.target is EVICT_H2O:
        if schema.get(node, "heavy_f") or schema.get(node, "recent_f"):
            return None, FRACTION_REASON
        return int(schema.get(node, "heavy_n")) + int(schema.get(node, "recent_n")), None
    return None, FASTGEN_REASON if node.target is EVICT_FASTGEN else f"{node.target.name()} has no decode translation"


def _one_head_set(names: dict, specs: dict) -> bool:
    """The op's k, v (outputs 0, 1) and k_pos (output 2) states share their KV heads, k_pos [B, Hk, S]
    (not a latent layer's one-head payload)."""
    if not all(i in names for i in (0, 1, 2)):
        return False
    k, v, kp = (specs[names[i]].shape for i in (0, 1, 2))
    return len(kp) == 3 and len(k) == len(v) == 4 and k[1] == v[1] == kp[1]


def _state_outputs(node, out_node, state_names):
    """{op output index: state name} when every output goes straight to the state, else None."""
    outs = list(out_node.args[0])
    names = {}
    for user in node.users:
        if user.target is not operator.getitem or set(user.users) != {out_node}:
            return None
        _, index = user.args  # operator.getitem(op node, output index)
        for j, o in enumerate(outs):
            if o is user:
                names[index] = state_names[j - 1]
    return names


def decode_graph(gm: torch.fx.GraphModule, state_specs: list):
    """A copy of ``gm`` for T = 1 steps with slot eviction in the graph.

    Returns ``(gm, capacity, in_graph, left)``: ``in_graph`` lists the eviction ops (one per layer)
    now computed in the graph, ``left`` the ones still split at decode ``{"op", "layer", "reason"}``;
    ``capacity`` maps each state of an in-graph evicting layer to
    ``{"slots": c, "fill": v}`` (the runtime pads it to c slots of v after the prefill). The eviction
    nodes the module docstring leaves split stay as they are (``split`` cuts them)."""
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    state_names, specs = [s.name for s in state_specs], {s.name: s for s in state_specs}
    capacity, in_graph, left = {}, [], []
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
        c, why = _capacity(node)
        names = _state_outputs(node, out_node, state_names) if c is not None else None
        if c is not None:
            why = VIEW_REASON if names is None else None if _one_head_set(names, specs) else LATENT_REASON
        if why is not None:
            left.append({"op": node.target.name(), "layer": node.meta.get("graphwright", {}).get("layer"), "reason": why})
            continue
        in_graph.append(node.target.name())
        node.target = h2o_decode if node.target is EVICT_H2O else streaming_decode
        capacity.update({name: {"slots": c, "fill": -1 if i == 2 else 0} for i, name in names.items()})
    gm.graph.lint()
    gm.recompile()
    return gm, capacity, in_graph, left


def pad_to_capacity(state: list, names: list, seq_dims: list, capacity: dict) -> list:
    """Grow each capacity state to its slot count along its seq dim (``fill``: -1 positions, 0 else)."""
    out = []
    for t, name, dim in zip(state, names, seq_dims):
        cap = capacity.get(name)
        if cap is None or t.shape[dim] >= cap["slots"]:
            out.append(t)
            continue
        pad_shape = list(t.shape)
        pad_shape[dim] = cap["slots"] - t.shape[dim]
        out.append(torch.cat([t, torch.full(pad_shape, cap["fill"], dtype=t.dtype, device=t.device)], dim))
    return out
