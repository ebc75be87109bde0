"""In-graph eviction at the ONNX prompt step: StreamingLLM and H2O (token counts) run inside ``model.onnx``.

Before this module every prompt step (T > 1) was split (``split.py``): the session ran, then the
eviction op ran in torch on the cut tensors. For a policy whose kept count per (row, KV head) is
bounded by a constant c, the compaction has a shape the exporter can carry: ``prompt_graph``
replaces such an eviction node by out-of-place tensor ops (TopK, GatherElements, Where, MatMul,
Softmax) so a prompt step is one ONNX Runtime session run:

* the keep mask is the reference's own (``eviction_ref.streaming_keep``; H2O: the column sums of
  this step's fp32 attention probabilities added to the running score, then ``h2o_keep``'s rule
  with the top ``heavy`` non-recent scores ranked by one TopK over all slots, ties to the earlier
  slot as the reference's stable sort and ONNX TopK);
* ``compact_fixed`` gathers the kept slots of each (row, KV head) to the front in position order
  (one TopK over ``-position`` of the kept slots) into ``min(S, c)`` slots (``torch.sym_min`` of the
  input width and the constant: a shape expression, not data), filler slots get position -1 and
  zeros. The reference compacts to the largest kept count; at a first prompt step that is
  ``min(T, c)`` too, so the state shapes (and ``kv_bytes``) equal the torch runtime's. A later
  multi-token step may hold a few more empty slots than the reference; kept sets are the same.

Native sliding-window layers (``passes/native_windows.py``: ``evict_streaming`` with sinks=0, window
w - 1) use the same StreamingLLM translation, so the prompt step keeps each row's last w - 1 tokens,
and ``decode_slots`` rings them at decode: ONNX Runtime holds what HF's ``DynamicCache`` holds.

Left split at the prompt step (reasons in ``graphwright.json["prompt"]["split"]``; ``PROMPT_REASONS``):
SnapKV (it compresses only a first prompt step, S == T, and appends at later multi-token steps: the
output width depends on a shape comparison one graph cannot branch on), H2O with fraction budgets
(the kept count follows each row's length, a value, so the compacted width is data dependent: an
unbacked size), FastGen (per-head policy profiling picks data-dependent kept counts per head), latent
caches (one payload for every head: the heads' union has a data-dependent width) and any op whose
outputs feed more than the next step's state (SnapKV + ThinK).

Invariant tested (``tests/onnx/test_onnx_prompt_slots.py``): for each lowered policy the in-graph
prompt step keeps the same position set per (row, KV head) as the compacting reference and its logits
agree within 1e-4 (batch 2, left-padded), in torch and in ONNX Runtime; ``graphwright.json``
records which steps are one session run and which are split, with the reason.
"""

from __future__ import annotations

import copy

import torch

from ...ops import schema
from ...ops.eviction import EVICT_FASTGEN, EVICT_H2O, EVICT_OPS, EVICT_SNAPKV, EVICT_STREAMING
from ...capture.ops import visible_mask
from ...ops.eviction_ref import row_length, streaming_keep
from .decode_slots import _one_head_set, _state_outputs

PROMPT_REASONS = {
    EVICT_SNAPKV: "SnapKV compresses only a first prompt step (S == T) and appends at later multi-token steps: "
                  "the output width depends on a shape comparison one graph cannot branch on",
    EVICT_FASTGEN: "FastGen profiles each head's policy at the prompt step: the kept count per head is data dependent "
                   "(an unbacked output size the exporter cannot carry into the state)",
}
FRACTION_REASON = ("H2O with fraction budgets: the kept count follows each row's length (a value, not a shape), "
                   "so the compacted width is data dependent")
LATENT_REASON = "latent cache (one payload for every KV head): the heads' union has a data-dependent width"
VIEW_REASON = "the op's outputs feed more than the next step's state (another runtime op, or view ops)"


def compact_fixed(keep, k_pos, tensors, capacity: int):
    """Kept slots of each (row, KV head) first, in position order, in ``min(S, capacity)`` slots.

    ``keep`` [B, Hk, S] must hold at most ``capacity`` True per (row, head). Returns
    ``(k_pos, *tensors)`` gathered (tensors [B, Hk, S, ...]); filler slots: position -1, zeros."""
    keep = keep & (k_pos >= 0)
    width = torch.sym_min(k_pos.shape[2], capacity)
    key = torch.where(keep, -k_pos.float(), torch.full_like(k_pos, -(2 ** 30), dtype=torch.float32))
    idx = torch.topk(key, width, dim=-1).indices  # the smallest kept positions first
    sel = keep.gather(2, idx)
    out = [torch.where(sel, k_pos.gather(2, idx), torch.full_like(idx, -1).to(k_pos.dtype))]
    for x in tensors:
        shape = idx.shape + x.shape[3:]
        i = idx.view(*idx.shape, *([1] * (x.dim() - 3))).expand(shape)
        m = sel.view(*sel.shape, *([1] * (x.dim() - 3)))
        out.append(torch.where(m, x.gather(2, i), torch.zeros((), dtype=x.dtype)))
    return tuple(out)


def prompt_colsum(q, k, q_pos, k_pos, scale, key_bias=None) -> torch.Tensor:
    """``eviction_ref.colsum`` in one block (no Python loop over a symbolic T): [B, Hk, S] fp32."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    s = torch.matmul(q.float().reshape(B, Hk, g, T, D), k.float().transpose(-1, -2)[:, :, None]) * scale
    if key_bias is not None:
        s = s + key_bias.float().view(B, Hk, g, 1, S)
    s = s.masked_fill(~visible_mask(q_pos, k_pos), torch.finfo(torch.float32).min)
    p = torch.softmax(s, dim=-1) * (q_pos >= 0)[:, None, None, :, None]
    return p.sum(dim=3).mean(dim=2)


def _rank(score: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S] rank of each candidate by score, descending, ties to the earlier slot (non-candidates last)."""
    s = score.float().masked_fill(~cand, float("-inf"))
    order = torch.topk(s, s.shape[-1], dim=-1).indices
    ar = torch.arange(s.shape[-1], device=s.device).expand_as(order)
    return torch.zeros_like(order).scatter(-1, order, ar)


def h2o_prompt(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """``evict_h2o`` (token-count budgets) at a prompt step, compacted to heavy + recent slots. -> (k, v, k_pos, score)."""
    B, Hk, S = k_pos.shape
    score = torch.cat([score.float(), score.new_zeros(B, Hk, S - score.shape[2])], dim=2)
    score = score + prompt_colsum(q, k, q_pos, k_pos, scale, key_bias)
    length = row_length(q_pos)
    valid = k_pos >= 0
    is_recent = valid & (k_pos >= (length - recent_n)[:, None, None])
    cand = valid & ~is_recent
    keep = is_recent | (cand & (_rank(score, cand) < heavy_n))
    kp, k, v, score = compact_fixed(keep, k_pos, (k, v, score), heavy_n + recent_n)
    return k, v, kp, score


def streaming_prompt(k, v, q_pos, k_pos, sinks, window):
    """``evict_streaming`` at a prompt step, compacted to sinks + window slots. -> (k, v, k_pos)."""
    keep = streaming_keep(k_pos, row_length(q_pos), sinks, window)
    kp, k, v = compact_fixed(keep, k_pos, (k, v), sinks + window)
    return k, v, kp


def _translation(node):
    """(prompt function, slot bound c, None) or (None, None, why)."""
    if node.target is EVICT_STREAMING:
        return streaming_prompt, int(schema.get(node, "sinks")) + int(schema.get(node, "window")), None
    if node.target is EVICT_H2O:
        if schema.get(node, "heavy_f") or schema.get(node, "recent_f"):
            return None, None, FRACTION_REASON
        return h2o_prompt, int(schema.get(node, "heavy_n")) + int(schema.get(node, "recent_n")), None
    return None, None, PROMPT_REASONS.get(node.target, f"{node.target.name()} has no prompt-step translation")


def prompt_graph(gm: torch.fx.GraphModule, state_specs: list):
    """A copy of ``gm`` whose eviction ops with a prompt translation run in the graph.

    Returns ``(gm, record)``, ``record = {"in_graph": [{"op", "layer"}], "split": [{"op", "layer",
    "reason"}], "capacity": {state name: c}}``: the ops now computed in the graph, the ones still split
    (``split`` cuts them) and the states whose next width is ``min(S + T, c)`` (not ``S + T``)."""
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    state_names, specs = [s.name for s in state_specs], {s.name: s for s in state_specs}
    in_graph, left, capacity = [], [], {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in EVICT_OPS:
            continue
        fn, c, why = _translation(node)
        names, direct = _state_outputs(node, out_node, state_names)
        if why is None:
            if not (direct and _one_head_set(names, specs)):
                why = LATENT_REASON if any(specs[n].kind == "kv" and len(specs[n].shape) == 3 for n in state_names
                                           if specs[n].layer == node.meta.get("graphwright", {}).get("layer")) else VIEW_REASON
        layer = node.meta.get("graphwright", {}).get("layer")
        if why is not None:
            left.append({"op": node.target.name(), "layer": layer, "reason": why})
            continue
        in_graph.append({"op": node.target.name(), "layer": layer})
        node.target = fn
        capacity.update({name: c for name in names.values()})
    gm.graph.lint()
    gm.recompile()
    return gm, {"in_graph": in_graph, "split": left, "capacity": capacity}
