"""Exact multi-token continuation steps for ``duo``'s streaming heads: their attention masked to sinks + window.

``duo`` (``passes/duo.py``) prefills densely; from the first later step a streaming head's query at position i sees
the keys j with j < sinks or i - j <= window, and after every step its cache is cut to the first ``sinks`` and the
last ``window`` positions (``ops.eviction_ref.streaming_keep``, by position). Its decode steps therefore change the
cache after the prompt step, so ``score_continuation`` cannot feed a graph with them several tokens per step as it
is: a multi-token step's queries would see every key the step appended.

The same step graph with one change does score a continuation exactly: every duo streaming attention masked by
position with ``window + 1`` and ``sinks`` (``capture.ops.visible_mask``: k_pos < sinks or q_pos - k_pos <
window + 1). The cache entering a continuation step that starts at position P holds the sinks and positions
P - window .. P - 1, the step appends positions P .. P + T - 1, so a query at P + t finds every key it sees in
a decode step and no other; the cut after the step keeps sinks + the last ``window`` positions, what T decode
steps leave. The prompt step keeps the original graph (dense for every head, as ``duo`` runs).

``windowed_step(cm)`` builds that step: a copy of the runtime graph with the mask set on each duo streaming
attention, lowered by the model's backend (weights shared, not copied), once per compiled model. It is used only for continuation
steps; ``streaming_evictions`` names the eviction nodes it makes safe, so ``append_only_refusal`` can ignore
them and still refuse every other policy that evicts later.

Refused (the reason is returned): duo's streaming heads on a latent cache (``duo + lowrank_kv``: their eviction
runs on the latent payload, not checked here), a streaming attention that already has a window (a model's own sliding window), an eviction
op on a streaming head that is not duo's ``evict_streaming`` with duo's settings.

Invariant tested (``tests/runtime/test_continuation.py``): on tiny Llama, ``duo`` with a split layer and a
layer whose heads all stream gives ``score_stream``'s per-token NLL within 1e-5 in one continuation step, in
blocks of 5 and of 1, with the same ``kv_bytes``.
"""

from __future__ import annotations

import copy

import torch

from ..codegen.lower import lower
from ..ops import schema
from ..ops.eviction import EVICT_OPS
from ..ops.policy_streaming import STREAMING_POLICY
from ..passes.eviction_common import is_duo_streaming


def _streaming_attention(node) -> bool:
    """An attention node of duo's streaming heads (the tag ``passes/duo.py`` gives them)."""
    return schema.is_attention(node) and is_duo_streaming(node)


def streaming_evictions(cm) -> tuple[set, str | None]:
    """(names of duo's streaming eviction nodes in ``cm.runtime_graph``, None) or (empty set, why not windowable)."""
    notes = getattr(cm, "step_graph", cm.runtime_graph).notes.get("duo")
    if notes is None:
        return set(), None
    sinks, window = notes["settings"]["sinks"], notes["settings"]["window"]
    graph = cm.runtime_graph.gm.graph
    attn = [n for n in graph.nodes if _streaming_attention(n)]
    names = set()
    for node in attn:
        if not schema.has_arg(node.target, "k"):
            return set(), (f"duo's streaming heads on a latent cache ({node.name}, duo + lowrank_kv) are not scored in "
                           "windowed continuation steps")
        if schema.get(node, "window") or schema.get(node, "sinks"):
            return set(), f"duo's streaming attention {node.name} already has a window (a model's own sliding window)"
        k = schema.get(node, "k")
        ev = [u for u in k.users if u.op == "call_function" and u.target in EVICT_OPS]
        if len(ev) != 1 or ev[0].target != STREAMING_POLICY.op:
            return set(), f"duo's streaming keys of {node.name} are evicted by {[u.target for u in ev]}, not one evict_streaming"
        if (schema.get(ev[0], "sinks"), schema.get(ev[0], "window")) != (sinks, window):
            return set(), f"{ev[0].name} keeps sinks/window other than duo's {sinks}/{window}"
        names.add(ev[0].name)
    return names, None


_CACHE = "_duo_windowed_step"  # attribute of the compiled model: (runtime graph module, backend, step)


def windowed_step(cm):
    """The continuation step function of ``cm`` (a ``duo`` model): its runtime graph with every duo streaming
    attention masked to sinks + window + itself (module docstring), lowered by ``cm``'s backend.

    Built once per compiled model and kept on it (one lowering, not one per perplexity window); rebuilt if the
    model's runtime graph or backend object is not the one it was built from."""
    cached = getattr(cm, _CACHE, None)
    if cached is not None and cached[0] is cm.runtime_graph.gm and cached[1] is cm.backend_object:
        return cached[2]
    step = _build_windowed_step(cm)
    setattr(cm, _CACHE, (cm.runtime_graph.gm, cm.backend_object, step))
    return step


def _build_windowed_step(cm):
    settings = cm.step_graph.notes["duo"]["settings"]
    gm = cm.runtime_graph.gm
    windowed = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # shares gm's parameters and buffers
    changed = 0
    for node in windowed.graph.nodes:
        if _streaming_attention(node):
            schema.set(node, "window", settings["window"] + 1)
            schema.set(node, "sinks", settings["sinks"])
            changed += 1
    if not changed:
        raise ValueError("windowed_step: the graph has no duo streaming attention")
    windowed.recompile()
    lowered = lower(windowed, cm.backend_object)

    def step(input_ids, positions, logits_index, state):
        out = lowered(input_ids, positions, logits_index, *state)
        return out[0], list(out[1:])

    return step
