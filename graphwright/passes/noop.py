"""``noop``: an exact pass that changes nothing but leaves a full trail.

It exists to test the recipe machinery end to end (parse, instantiate, run on a copy, record
notes, verify exactness) without depending on any real rewrite.
"""

from __future__ import annotations

from ..capture.ops import ATTENTION
from .base import Pass, PassContext, register_pass


@register_pass
class Noop(Pass):
    name = "noop"
    stage = 0
    examples = {"exact": "noop", "lossy": None, "models": ("tiny-llama", "tiny-gpt2", "tiny-gemma3")}
    exact = True
    args = ()
    doc = "Leave the graph unchanged; record that every attention layer was visited."

    def run(self, sg, ctx: PassContext):
        layers = [n.meta.get("graphwright", {}).get("layer") for n in sg.nodes(ATTENTION)]
        sg.notes["noop"] = {
            "per_layer": {layer: {"visited": True} for layer in sorted(layer for layer in layers if layer is not None)},
            "counts": {"attention_nodes": len(layers)},
        }
        return sg
