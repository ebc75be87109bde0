"""ONNX native sliding-window layers hold only their window: the export runs on ``bound_native_windows``' graph.

HF's ``DynamicCache`` keeps the last w - 1 tokens of a native sliding layer (Gemma-3's local layers,
Mistral's); the torch backends do the same through ``passes/native_windows.py`` (a StreamingLLM
eviction with sinks=0, window w - 1, applied by ``Backend.step_rewrites``). ``export_view`` gives
``export_onnx`` that rewritten graph instead of the captured one, so the artifact's state is the
torch runtime's: the prompt step keeps each row's last w - 1 tokens in the graph
(``prompt_slots.streaming_prompt``: TopK by position into ``min(T, w - 1)`` slots) and each decode
step writes the new token into the slot of the one that left the window
(``decode_slots.streaming_decode``, a ring of w - 1 slots). Nothing is split for these layers.

Invariant tested (``tests/onnx/test_onnx_sliding_window.py``): tiny-gemma3 (window 8), batch 2
left-padded prompts longer than the window: after the prefill and after 30+ decode steps the ONNX
Runtime's ``last_stats["kv_bytes"]`` equals the bytes of HF's ``DynamicCache`` tensors, and logits and
greedy tokens equal the torch backend's (<= 1e-4).
"""

from __future__ import annotations

from ...passes.native_windows import NOTE, bound_native_windows


class ExportView:
    """A ``CompiledModel`` seen by the exporter: ``step_graph`` is the graph the artifact runs
    (native windows bounded); every other attribute is the compiled model's own."""

    def __init__(self, cm, step_graph):
        self._cm = cm
        self.step_graph = step_graph

    def __getattr__(self, name):
        return getattr(self._cm, name)


def export_view(cm):
    """``cm`` itself when no layer has a native window the rewrite bounds, else an ``ExportView``."""
    sg = bound_native_windows(cm.step_graph)
    return cm if sg is cm.step_graph else ExportView(cm, sg)


def sliding_record(sg) -> dict | None:
    """``graphwright.json["sliding_windows"]``: ``{layer: {"window", "cached_tokens"}}`` of the bounded layers, or None."""
    note = sg.notes.get(NOTE)
    return {str(layer): dict(v) for layer, v in note.items()} if note else None
