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

from ..ops.policy_h2o import H2O_POLICY
from .base import MAX_TOKENS, Arg, PassContext, Tunable, register_pass
from .eviction_common import (HEADS_ARG, LAYERS_ARG, RETRIEVAL_PART, EvictionPass, evict_pass_build, frac_or_count,
                              latent_settings, refuse_adaptive_heads, rewrite_layers)


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
        HEADS_ARG,
        LAYERS_ARG,
    )

    also_on = RETRIEVAL_PART  # after duo: H2O evicts the retrieval heads' cache at every step
    removes = EvictionPass.removes | {"retrieval_part"}

    def __init__(self, **values):
        super().__init__(**values)
        refuse_adaptive_heads("h2o", self.heads)

    def is_identity(self) -> bool:
        return any(isinstance(x, float) and x >= 1.0 for x in (self.heavy, self.recent))

    def run(self, sg, ctx: PassContext):
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
