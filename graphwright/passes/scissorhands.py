"""``scissorhands``: Scissorhands KV eviction (persistence of importance, counting form).

Technique (arXiv 2305.17118, "Scissorhands: Exploiting the Persistence of Importance Hypothesis for
LLM KV Cache Compression at Test Time"; no official code: the counting form of the reproduction
AnswerDotAI/cold-compress). Every step records, per cached token and KV head, whether its
attention reached 1/n (n = tokens cached); importance is the mean of the last ``history``
records; when a head holds more than ``budget`` - 1 tokens after a step the least important ones
are dropped, never a sink (position < ``sinks``) nor one of the last ``recent``; ties drop the oldest.
Defaults history = 400, recent = 10 (attributed to the paper by the reproduction), sinks = 0;
budget = 2048 (snapkv's default; the paper sets it per experiment).
Op and state (packed ring buffer of indicator bits): ``ops/policy_scissorhands.py``.

Exact setting: ``budget`` >= total length (prompt + new tokens). Refused: budget - 1 < sinks +
recent (the protected tokens alone would exceed the budget). Invariants tested
(``tests/passes/test_scissorhands.py``): identity at the exact setting (tiny Llama, Qwen2,
Gemma3, batch 2 left-padded); first token equals dense; budget holds; the op's kept sets equal a
per-step loop with Python lists over hundreds of steps (batch 2 ragged); composes with
``lowrank_kv`` and ``steer``.
"""

from __future__ import annotations

from ..errors import RecipeError
from ..ops.policy_scissorhands import SCISSORHANDS_POLICY, ring_bytes
from .base import MAX_TOKENS, Arg, PassContext, register_pass
from .eviction_common import LAYERS_ARG, EvictionPass, evict_pass_build, latent_settings, rewrite_layers


@register_pass
class Scissorhands(EvictionPass):
    name = "scissorhands"
    examples = {"exact": "scissorhands(budget=64)", "lossy": "scissorhands(budget=10, history=8, recent=2)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"), "first_token_dense": True}
    exact = False
    doc = "Scissorhands: drop the tokens least often above-average in attention over a history window; fixed budget per KV head."
    args = (
        Arg("budget", int, 2048, "tokens each KV head attends to at most (the next token included)", min=1, max=MAX_TOKENS),
        Arg("history", int, 400, "history window m: indicators kept per token", min=1, max=MAX_TOKENS),
        Arg("recent", int, 10, "most recent tokens never dropped", min=0, max=MAX_TOKENS),
        Arg("sinks", int, 0, "first positions never dropped", min=0, max=MAX_TOKENS),
        LAYERS_ARG,
    )

    def __init__(self, **values):
        super().__init__(**values)
        if self.budget - 1 < self.sinks + self.recent:
            raise RecipeError(f"scissorhands: budget={self.budget} holds budget - 1 = {self.budget - 1} cached tokens, fewer than "
                              f"sinks + recent = {self.sinks + self.recent} protected ones; use budget >= sinks + recent + 1")

    def run(self, sg, ctx: PassContext):
        params = {"budget": int(self.budget), "history": int(self.history), "recent": int(self.recent), "sinks": int(self.sinks)}
        build = evict_pass_build(SCISSORHANDS_POLICY, params, widths={"bits": ring_bytes(self.history)})
        layers = rewrite_layers(sg, "scissorhands", build, self.layer_set(sg.info))
        sg.notes["scissorhands"] = {
            "per_layer": {layer: {"budget": self.budget} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, "score": "mean of the last `history` indicators A >= 1/n (A: mean over query heads)",
                         "ring_bytes_per_slot": ring_bytes(self.history), **latent_settings(sg)},
        }
        return sg
