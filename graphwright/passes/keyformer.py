"""``keyformer``: Keyformer KV eviction (recent window + key tokens by a Gumbel-softmax score).

Technique (arXiv 2403.09054, "Keyformer: KV Cache Reduction through Key Tokens Selection for
Efficient Generative Inference"; reference code d-matrix-ai/keyformer-llm). Every step, prefill
included, adds f = softmax((x + zeta) / tau_t) (zeta ~ Gumbel(0, 1), tau_t = tau_init + t * tau_delta)
to each cached key's score; the cache keeps the last w positions (counting the next token's slot)
plus the k - w best older scores. The budget is frozen at the prompt: k = floor(S_prompt * kv)
(``kv`` a fraction; an int is a token count), w = floor(k * recent). Defaults from the source:
kv = 0.6, recent = 0.3, tau_init = 1.0, tau_delta = 0.01. Op, state and noise stream:
``ops/policy_keyformer.py`` (per-sample scores, GQA group sum, real eviction: documented there).

Exact setting: ``kv`` an int >= prompt + new tokens (nothing is dropped). ``kv=1.0`` is *not* exact
for decode (k is frozen at the prompt length, so eviction starts at the first new token).
Invariants tested (``tests/passes/test_keyformer.py``): identity at the exact setting (tiny Llama,
Qwen2, Gemma3; batch 2 left-padded); first token equals dense; budget holds over 300 decode
steps; noise "none", tau 1 equals H2O accumulation; a fixed noise table gives the kept sets of a
per-step Python loop; seeded runs are reproducible and the seed matters; composes with
``lowrank_kv`` and ``steer``.
"""

from __future__ import annotations

from ..errors import RecipeError
from ..ops.policy_keyformer import KEYFORMER_POLICY, NOISES
from .base import MAX_TOKENS, Arg, PassContext, register_pass
from .eviction_common import LAYERS_ARG, EvictionPass, frac_or_count, insert_policy, latent_settings, rewrite_layers


@register_pass
class Keyformer(EvictionPass):
    name = "keyformer"
    examples = {"exact": "keyformer(kv=64)", "lossy": "keyformer(kv=0.5, recent=0.3)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"), "first_token_dense": True}
    exact = False
    doc = "Keyformer: keep a recent window plus key tokens by an accumulated Gumbel-softmax score; budget frozen at the prompt."
    args = (
        Arg("kv", (int, float), 0.6, "budget k: fraction of the prompt length (float) or token count (int)", min=0, max=MAX_TOKENS),
        Arg("recent", float, 0.3, "recent window w = floor(k * recent)", min=0.0, max=1.0),
        Arg("tau_init", float, 1.0, "Gumbel-softmax temperature at the first step", min=1e-6, max=1e6),
        Arg("tau_delta", float, 0.01, "temperature increment per step", min=0.0, max=1e6),
        Arg("seed", int, 0, "noise seed (stream per layer and step)", min=0, max=2 ** 31 - 1),
        Arg("noise", str, "gumbel", "score noise", choices=NOISES),
        LAYERS_ARG,
    )

    def __init__(self, **values):
        super().__init__(**values)
        if self.kv == 0:
            raise RecipeError("keyformer: kv must be > 0 (a fraction of the prompt length, or a token count >= 1)")

    def run(self, sg, ctx: PassContext):
        kn, kf = frac_or_count(self.kv)
        params = {"kv_n": kn, "kv_f": kf, "recent": float(self.recent), "tau_init": float(self.tau_init),
                  "tau_delta": float(self.tau_delta), "seed": int(self.seed), "noise": self.noise}

        def build(sg, ed, site, kp_all):
            return insert_policy(sg, ed, site, KEYFORMER_POLICY, {**params, "layer": site.layer})

        layers = rewrite_layers(sg, "keyformer", build, self.layer_set(sg.info))
        sg.notes["keyformer"] = {
            "per_layer": {layer: {"kv": self.kv, "recent": self.recent} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, "score": "sum over rows and query heads of softmax((x + gumbel) / tau_t), per sample",
                         "budget": "frozen at the first step's length", **latent_settings(sg)},
        }
        return sg
