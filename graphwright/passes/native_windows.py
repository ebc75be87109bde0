"""Native sliding-window layers hold only their window: ``bound_native_windows``.

A layer whose captured ``graphwright.attention`` has a native sliding window w (Gemma-3's sliding
layers, Mistral's) never attends to a key more than w - 1 positions back, yet the captured step
graph keeps its whole history in the cache. HF's own cache (``DynamicSlidingWindowLayer``) keeps
the last w - 1 tokens of such a layer after every forward, prefill included (the next query brings
the w-th). This rewrite gives the layer the same cache: per-head positions state and a
``graphwright.evict_streaming`` node with ``sinks=0, window=w - 1`` after its attention, i.e. exactly
StreamingLLM's eviction without the sinks and without its cache-index RoPE (keys stay rotated at
their absolute positions, so attention is unchanged). On the torch backend that op is
``eviction_slots.streaming_slots`` at decode: a ring of w - 1 slots, the new token written into
the slot of the token that left the window; the prefill compacts with the reference (the last
w - 1 tokens of each row).

The torch backends apply it when lowering (``Backend.step_rewrites``), after every pass: the
compiled model's ``step_graph`` (what passes, reports and ONNX export read) keeps the captured
layout, ``CompiledModel.runtime_graph`` is what runs. A layer a pass has already rewritten (an
eviction pass or ``streaming``: per-layer positions; ``lowrank_kv``: a latent cache; ``steer``: a key
bias) is left as the pass made it: the pass's own cache policy rules there.

Invariants tested (``tests/runtime/test_sliding_cache.py``): tiny-gemma3, batch 2 left-padded,
prompts longer than the window: logits and greedy tokens equal HF's and the unbounded run's; the
sliding layer's k/v bytes equal the k/v bytes in HF's ``past_key_values`` after prefill and after
generating past the window; ``kv_bytes_dense`` equals HF's cache bytes.
"""

from __future__ import annotations

from ..capture.ops import ATTENTION
from ..capture.step_graph import StepGraph
from ..ops import schema
from ..ops.policy_streaming import STREAMING_POLICY
from .eviction_common import evict_pass_build, find_sites, rewrite_layers

NOTE = "native_window_cache"


def window_layers(sg: StepGraph) -> dict:
    """``{layer: window}`` of the plain attention layers with a native window that still read the shared cache."""
    out = {}
    for node in sg.nodes(ATTENTION):
        layer, w = schema.layer_of(node), int(schema.get(node, "window", 0) or 0)
        if not w or layer is None or (sg.info.windows and sg.info.windows[layer] != w):
            continue  # no window, or one a pass set (window pass: a mask only, the dense model holds everything)
        if isinstance(find_sites(sg, {layer}), list):
            out[layer] = w
    return out


def bound_native_windows(sg: StepGraph) -> StepGraph:
    """A copy of ``sg`` whose native sliding-window layers keep their last w - 1 tokens (``sg`` itself when none)."""
    layers = window_layers(sg)
    if not layers:
        return sg
    sg = sg.copy()
    for w in sorted(set(layers.values())):
        chosen = {layer for layer, lw in layers.items() if lw == w}
        rewrite_layers(sg, "native_window", evict_pass_build(STREAMING_POLICY, {"sinks": 0, "window": w - 1}), chosen)
    sg.notes[NOTE] = {layer: {"window": w, "cached_tokens": w - 1} for layer, w in sorted(layers.items())}
    return sg
