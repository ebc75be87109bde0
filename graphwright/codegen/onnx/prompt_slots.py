"""In-graph eviction at the ONNX prompt step: StreamingLLM, H2O and SnapKV run inside ``model.onnx``.

Before this module every prompt step (T > 1) was split (``split.py``): the session ran, then the
eviction op ran in torch on the cut tensors. ``prompt_graph`` replaces an eviction node by
out-of-place tensor ops (TopK, GatherElements, Where, MatMul, Softmax, AveragePool/MaxPool,
ReduceMax) so a prompt step is one ONNX Runtime session run that returns the slot caches the decode
graph (``decode_slots.py``) expects:

* the keep mask is the reference's (``eviction_ref``): StreamingLLM keeps sinks + the last window
  by position; H2O adds the column sums of this step's fp32 attention probabilities (mean over the
  g query heads of a KV head) to the running score and keeps the recent budget plus the top heavy
  scores among the older slots; SnapKV scores the prefix by the attention of the last ``window``
  queries, pools it (``pool1d``), keeps the top ``budget - window`` per KV head plus the window, and
  at a later multi-token step (S > T: the reference appends) keeps every valid slot: the branch is a
  ``Where`` on ``S - T == 0``, a value computed from shapes. Top-k ranks come from one TopK over a
  key that breaks ties by slot (``rank``), the reference's stable-sort order;
* ``compact_fixed`` gathers the kept slots of each (row, KV head) to the front in position order
  (TopK over ``-position``), filler slots get position -1 and zeros. Width: ``min(S, c)`` for a
  constant bound c (StreamingLLM's sinks + window, H2O's heavy + recent token counts; a shape
  expression, so ``OnnxStep`` binds the outputs), else the largest kept count (H2O fractions,
  SnapKV: ``kept_width``, an unbacked size under ``torch.export``, a ReduceMax in ONNX; ORT
  allocates those outputs). At a first prompt step both equal the reference's compacted width, so
  the state shapes and ``kv_bytes`` are the torch runtime's.

Native sliding-window layers (``passes/native_windows.py``: ``evict_streaming`` with sinks=0,
window w - 1; ``sliding_window.py``) use the StreamingLLM translation.

Left split at the prompt step (reasons in ``graphwright.json["prompt"]["split"]``): FastGen (its
per-head policy is profiled at the prompt step from the attention's recovery ratio over five
nested policies, and its top-k of frequent tokens runs per policy: not written as graph ops yet),
latent caches (``lowrank_kv`` + eviction: one payload for every KV head, kept as the heads' union
through view ops the split records as ``derived`` chains), and an op whose outputs feed another
runtime op (SnapKV + ThinK: ThinK's channel split reads SnapKV's kept cache). Packed head-adaptive
SnapKV / PyramidKV caches are refused by ``export_onnx`` altogether.

Invariant tested (``tests/onnx/test_onnx_prompt_slots.py``): for each lowered policy the prompt
step keeps the same position set per (row, KV head) as the compacting reference, with the same
k/v/score rows, batch 2 left-padded, at a first prompt step and after a compacted cache; the
artifact's prompt step is one session run with the reference's sets, state widths and logits
(<= 1e-4); ``graphwright.json`` records which steps are one session run and which are split, and why.
"""

from __future__ import annotations

import copy
import operator

import torch

from ...capture.ops import visible_mask
from ...ops import schema
from ...ops.eviction import EVICT_FASTGEN, EVICT_H2O, EVICT_OPS, EVICT_SNAPKV, EVICT_STREAMING
from ...ops.eviction_ref import budget, pool1d, row_length, streaming_keep
from .decode_slots import _one_head_set, _state_outputs

FASTGEN_REASON = ("FastGen profiles each head's policy at the prompt step (recovery ratio over five nested "
                  "policies, a frequent-token top-k per policy): not written as graph ops yet")
LATENT_REASON = ("latent cache (one payload for every KV head): the heads' union reaches the state through view ops "
                 "(split records them as derived chains)")
VIEW_REASON = "the op's outputs feed more than the next step's state (another runtime op reads them, e.g. ThinK after SnapKV)"


def kept_width(keep: torch.Tensor) -> int:
    """The largest kept count over rows and heads (the reference's compacted width), as an unbacked
    size under ``torch.export`` (``.item()``): ONNX computes it at run time (ReduceMax)."""
    w = torch.ops.aten._local_scalar_dense.default(keep.sum(dim=-1).max())  # .item(), as the exporter translates it
    torch._check(w >= 0)
    torch._check(w <= keep.shape[-1])
    return w


def compact_fixed(keep, k_pos, tensors, width):
    """Kept slots of each (row, KV head) first, in position order, in ``width`` slots.

    ``keep`` [B, Hk, S] must hold at most ``width`` True per (row, head) (``width``: an int, a shape
    expression or ``kept_width``). Returns ``(k_pos, *tensors)`` gathered (tensors [B, Hk, S, ...]);
    filler slots: position -1, zeros."""
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


def rank(score: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S] rank of each candidate by score, descending, ties to the earlier slot (non-candidates last).

    The reference's stable sort (``eviction_ref.topk_mask``) has no ONNX translation; one TopK over
    an fp64 key that breaks ties by slot gives the same order: ``s * (1 - i * 2^-48) - i * 2^-1000``
    for slot i (exact for the non-negative fp32 scores here: the shift is below half an fp32 ulp of s,
    the second term orders equal zeros)."""
    i = torch.arange(score.shape[-1], device=score.device, dtype=torch.float64)
    key = score.double() * (i * -(2.0 ** -48) + 1) - i * 2.0 ** -1000
    order = torch.topk(key.masked_fill(~cand, float("-inf")), score.shape[-1], dim=-1).indices
    ar = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.zeros_like(order).scatter(-1, order, ar)


def h2o_prompt(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """``evict_h2o`` at a prompt step: token counts into ``min(S, heavy + recent)`` slots, fractions
    into the largest kept count (``kept_width``). -> (k, v, k_pos, score)."""
    B, Hk, S = k_pos.shape
    score = torch.cat([score.float(), score.new_zeros(B, Hk, S - score.shape[2])], dim=2)
    score = score + prompt_colsum(q, k, q_pos, k_pos, scale, key_bias)
    length = row_length(q_pos)
    valid = k_pos >= 0
    is_recent = valid & (k_pos >= (length - budget(recent_n, recent_f, length))[:, None, None])
    cand = valid & ~is_recent
    keep = is_recent | (cand & (rank(score, cand) < budget(heavy_n, heavy_f, length)[:, None, None]))
    width = kept_width(keep) if heavy_f or recent_f else torch.sym_min(S, heavy_n + recent_n)
    kp, k, v, score = compact_fixed(keep, k_pos, (k, v, score), width)
    return k, v, kp, score


def snapkv_prompt(q, k, v, q_pos, k_pos, scale, budget_, window, kernel, pool, key_bias=None):
    """``evict_snapkv`` at a prompt step: ``eviction_ref.snapkv_keep`` with its two branches as tensor
    selects (a first prompt step, S == T, compresses; a later one keeps every valid slot), compacted
    to the largest kept count. -> (k, v, k_pos)."""
    T, S = q.shape[2], k_pos.shape[2]
    n = (q_pos >= 0).sum(dim=1)
    w = torch.sym_min(window, T)
    obs = prompt_colsum(q[:, :, T - w:], k, q_pos[:, T - w:], k_pos, scale, key_bias)
    valid = k_pos >= 0
    start = (n - w)[:, None, None]
    prefix = valid & (k_pos < start)
    pooled = pool1d(obs.masked_fill(~prefix, 0.0), kernel, pool)
    keep = (prefix & (rank(pooled, prefix) < budget_ - w)) | (valid & (k_pos >= start))
    first = torch.full((), S - T, device=k_pos.device) == 0  # the cache was empty: compress
    compress = first & (n > budget_)[:, None, None]
    keep = (compress & keep) | (~compress & valid)  # logical ops: ORT has no boolean Where
    kp, k, v = compact_fixed(keep, k_pos, (k, v), kept_width(keep))
    return k, v, kp


def streaming_prompt(k, v, q_pos, k_pos, sinks, window):
    """``evict_streaming`` at a prompt step, compacted to ``min(S, sinks + window)`` slots. -> (k, v, k_pos)."""
    keep = streaming_keep(k_pos, row_length(q_pos), sinks, window)
    kp, k, v = compact_fixed(keep, k_pos, (k, v), torch.sym_min(k_pos.shape[2], sinks + window))
    return k, v, kp


def _translation(node):
    """(prompt function, slot bound c or None for a data-dependent width, None) or (None, None, why)."""
    if node.target is EVICT_STREAMING:
        return streaming_prompt, int(schema.get(node, "sinks")) + int(schema.get(node, "window")), None
    if node.target is EVICT_H2O:
        if schema.get(node, "heavy_f") or schema.get(node, "recent_f"):
            return h2o_prompt, None, None
        return h2o_prompt, int(schema.get(node, "heavy_n")) + int(schema.get(node, "recent_n")), None
    if node.target is EVICT_SNAPKV:
        return snapkv_prompt, None, None
    if node.target is EVICT_FASTGEN:
        return None, None, FASTGEN_REASON
    return None, None, f"{node.target.name()} has no prompt-step translation"


def prompt_graph(gm: torch.fx.GraphModule, state_specs: list):
    """A copy of ``gm`` whose eviction ops with a prompt translation run in the graph.

    Returns ``(gm, record)``, ``record = {"in_graph": [{"op", "layer"}], "split": [{"op", "layer",
    "reason"}], "capacity": {state name: c}}``: the ops now computed in the graph, the ones still split
    (``split`` cuts them) and the states whose next width is ``min(S + T, c)`` (``c``) or data dependent
    (None) instead of ``S + T``."""
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


APPEND = "_append"  # suffix of the extra outputs append_outputs adds: "<state>_append"
SNAPKV_PASS_THROUGH = (1, 2, 4)  # snapkv_prompt(q, k, v, q_pos, k_pos, ...) -> (k, v, k_pos): argument of each output


def append_outputs(gm: torch.fx.GraphModule, outputs: list) -> dict:
    """Give ``gm`` (a ``split`` result, ``outputs`` its output names) the appended cache of each in-graph
    SnapKV op as extra outputs ``<state>_append``: the k, v and k_pos the op compacts at a prompt step.

    At a decode step SnapKV appends (``decode_slots.snapkv_decode``), so ``decode.onnx`` is
    ``model.onnx`` with each ``<state>_append`` as its ``<state>_next`` and the compaction dropped
    (``decode_derive.derive_from_appends``): no second export, and no decode step pays for the
    prompt step's scoring, TopK and gathers. ``model.onnx`` itself is saved without these outputs.
    Returns ``{"<state>_next": "<state>_append"}`` and appends ``outputs`` in place; ``{}`` (``gm``
    unchanged) unless every output of every SnapKV op goes straight to the state from a computed value."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    snaps = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is snapkv_prompt]
    appends, extra = {}, []
    for node in snaps:
        for user in node.users:
            if user.target is not operator.getitem or user.args[1] >= len(SNAPKV_PASS_THROUGH):
                return {}
            src = node.args[SNAPKV_PASS_THROUGH[user.args[1]]]
            js = [j for j, o in enumerate(outs) if o is user]
            if len(js) != 1 or not isinstance(src, torch.fx.Node) or src.op != "call_function":
                return {}
            appends[outputs[js[0]]] = outputs[js[0]][:-len("_next")] + APPEND
            extra.append(src)
    if not appends or len(appends) != 3 * len(snaps):
        return {}
    out_node.args = (tuple(outs + extra),)
    outputs.extend(appends.values())
    gm.graph.lint()
    gm.recompile()
    return appends
