"""``gemfilter``: GemFilter prompt compression, a graph-level rewrite of how a prompt is run.

Based on arXiv:2409.17422 ("Discovering the Gems in Early Layers"; reference code
``my_baseline/GemFilter/gem_filter_utils.py::find_context``). Early layers already locate the
tokens a question needs: run layers 0..r, score every prompt token with the last query at layer r
(q_last . K^T pre-softmax, summed over heads, avg-pooled with kernel 5), keep the top ``keep``
token ids **in original order**, then run the whole model on only those tokens with fresh
positions 0..keep-1 and generate normally. Defaults: keep = 1024; r = 13 of 32 layers in the
paper (Llama-3.1-8B), so ``layer`` defaults to round(13/32 * num_layers).

Graph change. The step graph itself is unchanged (it is the "full" graph of pass 2). The pass
checks that layer r has one attention node whose q and k can be read and records its settings in
``sg.notes["gemfilter"]``; ``CompiledModel.generate`` then runs the selection with a graph
*derived from the compiled one* by truncating it after layer r's attention inputs
(``graphwright.ops.gemfilter.truncate_after_layer``: graph slicing + dead-code elimination,
no model surgery). ``cm.logits`` still scores the full prompt.

Exact setting: ``keep >= prompt length`` (every token is kept in order with the same positions).
Invariants tested (``tests/passes/test_gemfilter.py``): keep >= length gives identical tokens; the
kept ids equal a naive reference built from the HF model's own q/k (hooks + RoPE); the truncated
graph has no layer after r; bad layer / keep raise RecipeError.
"""

from __future__ import annotations

from ..errors import RecipeError
from ..ops.gemfilter import selection_node
from .base import MAX_KERNEL, MAX_TOKENS, Arg, Pass, PassContext, register_pass


def default_layer(num_layers: int) -> int:
    return max(0, min(num_layers - 1, round(13 / 32 * num_layers)))


@register_pass
class GemFilter(Pass):
    name = "gemfilter"
    needs = frozenset({"attention"})
    produces = frozenset({"prompt_selection"})
    excludes = {"head_split": "the selection reads one attention node's q and k at its layer",
                "key_bias": "the selection graph runs without the steering input",
                "latent_cache": "the selection reads its layer's dense keys, which lowrank_kv replaces by latents"}
    stage = 80
    examples = {"exact": "gemfilter(layer=1, keep=100000)", "lossy": "gemfilter(layer=1, keep=8)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3")}
    exact = False
    doc = "GemFilter: select prompt tokens with layer r's last query, then generate from the kept tokens only."
    args = (
        Arg("layer", int, None, "selection layer r (default round(13/32 * layers))", min=0, max=MAX_TOKENS),
        Arg("keep", int, 1024, "prompt tokens kept", min=1, max=MAX_TOKENS),
        Arg("kernel", int, 5, "avg-pool kernel over token scores (odd; 1 = no pooling)", min=1, max=MAX_KERNEL),
    )

    def applies_to(self, sg) -> str | None:
        if "gemfilter" in sg.notes:
            return "gemfilter is already in the recipe (apply it once)"
        return None

    def run(self, sg, ctx: PassContext):
        n = sg.info.num_layers
        layer = default_layer(n) if self.layer is None else self.layer
        if layer >= n:
            raise RecipeError(f"gemfilter: layer {layer} is out of range (layers 0..{n - 1})")
        if self.kernel % 2 == 0:
            raise RecipeError(f"gemfilter: kernel must be odd (centred pooling); got {self.kernel}")
        node = selection_node(sg.gm, layer)
        if isinstance(node, str):
            raise RecipeError(f"gemfilter: {node}")
        sg.notes["gemfilter"] = {
            "per_layer": {layer: {"role": "selects", "keep": self.keep}},
            "counts": {"layers_in_selection_pass": layer + 1},
            "settings": {"layer": layer, "keep": self.keep, "kernel": self.kernel, "positions": "fresh 0..k-1"},
        }
        return sg
