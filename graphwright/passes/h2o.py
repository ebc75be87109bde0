"""``h2o``: Heavy-Hitter Oracle KV eviction.

Technique (arXiv 2306.14048, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models"; reference code ``h2o_hf/utils_real_drop/modify_llama.py::H2OKVCache_LayerWise``).
Each cached key carries a score, the attention it has received summed over every query so far
(prompt rows at prefill, one row per decode step). After prefill and after every decode step the
cache keeps the last ``recent`` tokens plus the ``heavy`` highest-scoring older tokens; the score
buffer shrinks with the cache. Defaults heavy = recent = 0.1 (a 20% budget).

Setting here: per (batch row, KV head) selection, scores averaged over the g query heads of a KV
head (the paper's models are MHA); ``heavy``/``recent`` are fractions of the row's current length
(floats; the budget follows the sequence, as in the paper's ratio-based runs) or fixed token
counts (ints >= 1, as in the real-drop cache). Prefill runs dense: the first generated token
equals the dense model's. Cache state per layer: k, v [B, Hk, S_l, D], positions [B, Hk, S_l]
(-1 in padding slots) and fp32 scores [B, Hk, S_l].

Exact setting: ``heavy`` or ``recent`` a fraction >= 1.0 (budget >= length).

``heads="adaptive"`` (Ada-KV, arXiv 2407.11550, at every step): ``evict(score="h2o", when="decode",
rule="adaptive", budget=heavy + recent, window=recent, floor=floor)``: the layer's heavy budget
(Hk * heavy) is shared across its KV heads by cumulative score, each head keeping at least its top
round(floor * heavy); a packed per-layer cache (``ops/adakv_decode.py``). floor = 1.0 keeps the
uniform sets (tested, ``tests/passes/test_adakv_decode.py``).
``layers=[...]`` evicts only those layers (others keep their cache or another policy).

After ``duo`` (``also_on = retrieval_part``): H2O evicts only the retrieval heads' cache of each layer
duo left retrieval heads in (their own attention node over H_ret KV heads, per-head positions and
scores of that width), after prefill and every decode step; streaming heads keep duo's sinks + window;
all-streaming layers stay duo's. Exact: a fraction >= 1.0 gives duo alone, every head retrieval gives
h2o alone (``tests/passes/test_duo_h2o.py``: logits equal dense attention under the combined mask).
Invariants tested (``tests/passes/test_h2o.py``): identity at the exact setting (tiny Llama and
Qwen2, batch 2 left-padded, 32 new tokens); first token equals dense; the budget holds over 500
decode steps; the op's kept set equals a slow loop oracle on random attention.
"""

from __future__ import annotations

from ..errors import RecipeError
from ..ops.policy_h2o import H2O_POLICY
from .base import MAX_TOKENS, Arg, PassContext, Tunable, register_pass
from .eviction_common import (LAYERS_ARG, RETRIEVAL_PART, EvictionPass, evict_pass_build, frac_or_count,
                              latent_settings, rewrite_layers)


@register_pass
class H2O(EvictionPass):
    name = "h2o"
    examples = {"exact": "h2o(heavy=1.0)", "lossy": "h2o(heavy=4, recent=4)", "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"),
                "first_token_dense": True}
    exact = False
    doc = "H2O: keep recent tokens plus heavy hitters by cumulative attention (per KV head), after prefill and each step."
    args = (
        Arg("heavy", (int, float), 0.1, "heavy hitters: fraction of the current length (float) or token count (int)", min=0, max=MAX_TOKENS,
            tune=Tunable("float", 0.02, 0.5, scope="layer")),
        Arg("recent", (int, float), 0.1, "recent window: fraction of the current length (float) or token count (int)", min=0, max=MAX_TOKENS,
            tune=Tunable("float", 0.02, 0.5, scope="layer")),
        Arg("heads", str, "uniform", "per-head budgets: uniform, or adaptive (Ada-KV: the layer's heavy budget "
            "shared across its KV heads by score, re-split at every step)", choices=("uniform", "adaptive"),
            tune=Tunable("categorical", choices=("uniform", "adaptive"), scope="head", head_form="switch")),
        Arg("floor", float, None, "heads='adaptive': Ada-KV floor alpha, the share of its heavy budget each head "
            "keeps by its own scores (default 0.2; 1.0 = uniform)", min=0.0, max=1.0),
        LAYERS_ARG,
    )

    also_on = RETRIEVAL_PART  # after duo: H2O evicts the retrieval heads' cache at every step
    removes = EvictionPass.removes | {"retrieval_part"}

    def __init__(self, **values):
        super().__init__(**values)
        self.adaptive = None
        if self.heads != "adaptive":
            if self.floor is not None:
                raise RecipeError("h2o: floor= applies to heads='adaptive' only; leave it out or set heads='adaptive'")
            return
        if type(self.heavy) is not type(self.recent):
            raise RecipeError(f"h2o(heads='adaptive') needs heavy and recent of the same kind (both token counts or "
                              f"both fractions of the length); got heavy={self.heavy!r}, recent={self.recent!r}")
        from .evict import Evict  # evict imports this module's neighbours; import here

        self.adaptive = Evict(score="h2o", when="decode", rule="adaptive", budget=self.heavy + self.recent,
                              window=self.recent, floor=self.floor, layers=self.layers)

    def is_identity(self) -> bool:
        return any(isinstance(x, float) and x >= 1.0 for x in (self.heavy, self.recent))

    def run(self, sg, ctx: PassContext):
        if self.adaptive is not None:  # Ada-KV at every step: evict(score='h2o', when='decode', rule='adaptive')
            sg = self.adaptive.run(sg, ctx)
            sg.notes["h2o"] = {**sg.notes.pop("evict"), "adaptive": True}
            return sg
        hn, hf = frac_or_count(self.heavy)
        rn, rf = frac_or_count(self.recent)
        params = {"heavy_n": hn, "heavy_f": hf, "recent_n": rn, "recent_f": rf}
        layers = rewrite_layers(sg, "h2o", evict_pass_build(H2O_POLICY, params), self.target_layers(sg))
        self.note_on_duo(sg, layers, "the retrieval heads' cache (heavy hitters + recent, after prefill and every step)")
        budget = {"heavy": self.heavy, "recent": self.recent}
        sg.notes["h2o"] = {
            "per_layer": {layer: dict(budget) for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, "score": "cumulative attention, mean over query heads of a KV head",
                         **latent_settings(sg)},
        }
        return sg
