"""``snapkv``: SnapKV prompt compression.

Technique (arXiv 2404.14469, "SnapKV: LLM Knows What You are Looking for Before Generation";
reference code ``snapkv/monkeypatch/snapkv_utils.py::SnapKVCluster.update_kv``). After prefill,
when the prompt is longer than the budget C, the last ``window`` prompt queries (the observation
window, causal inside it) score every earlier key: softmax rows summed over the window, smoothed
with a 1-D pooling of width ``kernel`` (stride 1, zero padding kernel//2), and each head keeps its
top C - window prefix keys plus the window itself. Decode then appends every new token; nothing
is evicted later. Defaults C = 2048, window = 32 (here min(32, budget // 2), so that a small budget
such as ``snapkv(budget=16)`` still works and keeps selected prefix tokens), kernel = 5, avg pooling (the paper's LongBench
ablations also use kernel 7 with max pooling).

Setting here: selection per (batch row, KV head) with scores averaged over its g query heads
(the reference is MHA); rows shorter than the budget keep everything; left padding is dropped.
Prefill attention is dense, so the first generated token equals the dense model's.

Exact setting: budget >= prompt length (input dependent: the pass itself is lossy).
``layers=[...]`` evicts only those layers.
Invariants tested (``tests/passes/test_snapkv.py``): budget >= length gives identical tokens
(tiny Llama and Qwen2, batch 2 left-padded); first token equals dense; after prefill each head
holds exactly min(length, budget) tokens and grows by one per step; the op's kept set equals a
slow loop oracle on random attention.
"""

from __future__ import annotations

from ..errors import RecipeError
from ..ops.policy_snapkv import SNAPKV_POLICY
from .base import MAX_KERNEL, MAX_TOKENS, Arg, PassContext, register_pass
from .eviction_common import LAYERS_ARG, EvictionPass, evict_pass_build, latent_settings, rewrite_layers
from .packed_rewrite import rewrite_packed


@register_pass
class SnapKV(EvictionPass):
    name = "snapkv"
    examples = {"exact": "snapkv(budget=100000)", "lossy": "snapkv(budget=6, window=2)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"), "first_token_dense": True}
    exact = False
    doc = "SnapKV: after prefill keep per KV head the prompt keys the last `window` queries attend to most."
    args = (
        Arg("budget", int, 2048, "tokens kept per head after prefill (window included)", min=1, max=MAX_TOKENS),
        Arg("window", int, None, "observation window: the last prompt queries that vote (default min(32, budget // 2))",
            min=1, max=MAX_TOKENS),
        Arg("kernel", int, 5, "pooling width (odd)", min=1, max=MAX_KERNEL),
        Arg("pool", str, "avg", "pooling of the window scores", choices=("avg", "max")),
        Arg("heads", str, "uniform", "per-head budgets: uniform (SnapKV) or adaptive (Ada-KV: the layer's Hk*budget "
            "spread over its KV heads by score; packed cache)", choices=("uniform", "adaptive")),
        Arg("floor", float, 0.2, "Ada-KV safeguard alpha: each head keeps at least about floor*(budget-window) "
            "prefix tokens (1.0 = uniform)", min=0.0, max=1.0),
        Arg("pyramid", float, None, "PyramidKV beta: linearly decreasing per-layer budgets with the same total "
            "(1 = uniform; the paper uses 20); packed cache", min=1.0, max=1e6),
        LAYERS_ARG,
    )

    def __init__(self, **values):
        super().__init__(**values)
        if self.window is None:  # the paper's 32, shrunk so that small budgets still keep selected prefix tokens
            self.values["window"] = min(32, max(1, self.budget // 2))
        if self.window > self.budget:
            raise RecipeError(f"snapkv: window={self.window} must not exceed budget={self.budget}; pass window <= "
                              f"{self.budget} (or leave it out: the default is min(32, budget // 2) = "
                              f"{min(32, max(1, self.budget // 2))})")
        if self.kernel % 2 == 0:
            raise RecipeError(f"snapkv: kernel={self.kernel} must be odd (centred pooling)")

    @property
    def packed(self) -> bool:
        """Head-adaptive or pyramid budgets: the packed per-layer cache (``packed_rewrite``)."""
        return self.heads == "adaptive" or self.pyramid is not None

    def run(self, sg, ctx: PassContext):
        params = {"budget": self.budget, "window": self.window, "kernel": self.kernel, "pool": self.pool}
        if self.packed:
            params.update(adaptive=self.heads == "adaptive", floor=float(self.floor),
                          beta=float(self.pyramid) if self.pyramid is not None else 0.0)
            layers = rewrite_packed(sg, "snapkv", params, self.layer_set(sg.info))
        else:
            layers = rewrite_layers(sg, "snapkv", evict_pass_build(SNAPKV_POLICY, params), self.layer_set(sg.info))
        sg.notes["snapkv"] = {
            "per_layer": {layer: {"budget": self.budget} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, **latent_settings(sg)},
        }
        return sg
