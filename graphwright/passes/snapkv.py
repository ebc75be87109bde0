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

Query-aware by default: the observation window is the last ``window`` prompt tokens, so when a
prompt ends with its question (chat template and answer primer included) the question's tokens are
the ones that vote, and the kept keys are those the question attends to. Nothing else is needed
and nothing detects a question. The window must cover it: the needle prompts of ``graphwright eval``
end with 28-37 tokens after the context on SmolLM2 (question, end-of-turn, assistant header,
primer), about the default 32; give ``window=`` larger for longer questions.

Head-adaptive budgets (Ada-KV, arXiv 2407.11550; ``heads="adaptive"``, safeguard ``floor`` = alpha,
default 0.2 as in AdaKV's LongBench runs): a layer keeps Hk * budget slots in all, split over its
KV heads by the global top-(Hk * (budget - window)) of the pooled window scores (comparable across
heads: the same fp32 softmax and pooling, GQA mean), each head then getting round((1 - floor) * n_h
+ floor * (budget - window)) prefix tokens plus the window. ``floor=1`` is uniform SnapKV.
``split="kvpress"`` takes NVIDIA kvpress ``AdaKVPress``'s safeguard instead (``adakv_ref.kvpress_counts``:
each head's top int(floor * budget) tokens forced, the window among them, then the layer's global top),
to reproduce kvpress's AdaKV answers; the default stays the official rule.
PyramidKV layer budgets (arXiv 2406.02069; ``pyramid=beta``, the paper's 20): layer l gets
C_l = k_max - l * step prefix tokens per head (k_min = C/beta, k_max = 2C - k_min, clamped to the
prompt, integer step), the same total over layers (± L); ``pyramid=1`` is SnapKV; with
``heads="adaptive"`` C_l is the layer's C before the split. Both run once after prefill; decode
appends. Either one stores the layer in a packed cache (``packed_rewrite.py``: one [B, 1, N, D]
buffer per layer holding the sum of the heads' lengths, per-head positions [B, Hk, N]) so ragged
heads free real memory; ``last_stats["kv_bytes"]`` counts that buffer. Not on latent layers
(``lowrank_kv``: refused). Decode attends to the appended packed buffer once on every runtime
(``codegen/torch/packed_attention.py``, ``codegen/onnx/packed_decode.py``); the ``compiled`` backend bypasses the op at
decode (it returns its inputs) and appends Hk slots per step (``codegen/torch/static_eviction.py``). ONNX: the slot ops
are translated (``codegen/onnx/packed_cache.py``), ``evict_adakv`` runs as a cut runtime op (``split.py``).

After ``duo`` (``also_on = retrieval_part``): snapkv compresses the retrieval heads' prompt cache of
each layer duo left retrieval heads in; with ``heads="adaptive"`` the packed cache holds the retrieval
heads only (the layer's H_ret * budget spread over them); ``pyramid`` is refused there; all-streaming
layers stay duo's (``duo.py``, ``tests/passes/test_duo_snapkv_adaptive.py``).

Exact setting: budget >= prompt length (input dependent: the pass itself is lossy).
``layers=[...]`` evicts only those layers.
Invariants tested (``tests/passes/test_snapkv.py``): budget >= length gives identical tokens
(tiny Llama and Qwen2, batch 2 left-padded); first token equals dense; after prefill each head
holds exactly min(length, budget) tokens and grows by one per step; the op's kept set equals a
slow loop oracle on random attention. ``tests/passes/test_snapkv_adaptive.py``: budget >= length
is the identity with ``heads="adaptive"`` and with ``pyramid=20`` (Llama, Qwen2, batch 2
left-padded); ``floor=1``, ``pyramid=1`` and both give the uniform pass's kept sets after prefill and
its logits (1e-4); with floor 0 each layer keeps exactly Hk * budget and some split is ragged; the
kept sets equal a loop oracle of the spec (global sort, safeguard, pyramid schedule written from the
formula) on random attention with left padding; packed attention equals dense attention under the
boolean keep mask (1e-5); the packed buffer is exactly the longest row's total and
``last_stats["kv_bytes"]`` equals the bytes of those buffers (less than heads padded to the longest).
"""

from __future__ import annotations

from ..errors import RecipeError
from ..ops.adakv_shares import EVICT_ADAKV_SHARES
from ..ops.head_shares import share_weights
from ..ops.policy_snapkv import SNAPKV_POLICY
from .base import MAX_KERNEL, MAX_TOKENS, Arg, PassContext, Tunable, register_pass
from .eviction_common import (LAYERS_ARG, RETRIEVAL_PART, EvictionPass, evict_pass_build, latent_settings,
                              retrieval_layers, rewrite_layers)
from .packed_rewrite import rewrite_packed


@register_pass
class SnapKV(EvictionPass):
    name = "snapkv"
    examples = {"exact": "snapkv(budget=100000)", "lossy": "snapkv(budget=6, window=2)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"), "first_token_dense": True}
    exact = False
    doc = "SnapKV: after prefill keep per KV head the prompt keys the last `window` queries attend to most."
    args = (
        Arg("budget", int, 2048, "tokens kept per head after prefill (window included)", min=1, max=MAX_TOKENS,
            tune=Tunable("int", 0.05, 1.0, per_context=True, scope="layer")),
        Arg("window", int, None, "observation window: the last prompt queries that vote (default min(32, budget // 2))",
            min=1, max=MAX_TOKENS),
        Arg("kernel", int, 5, "pooling width (odd)", min=1, max=MAX_KERNEL),
        Arg("pool", str, "avg", "pooling of the window scores", choices=("avg", "max")),
        Arg("heads", str, "uniform", "per-head budgets: uniform (SnapKV), adaptive (Ada-KV: the layer's Hk*budget "
            "spread over its KV heads by score; packed cache) or scores (the model's L*Hk*budget spread over every "
            "(layer, KV head) by head-set retrieval score, (score + eps)^gamma, water-filled; packed cache)",
            choices=("uniform", "adaptive", "scores"),
            tune=Tunable("categorical", choices=("uniform", "adaptive"), scope="head", head_form="switch")),
        Arg("floor", float, 0.2, "Ada-KV safeguard alpha: each head keeps at least about floor*(budget-window) "
            "prefix tokens (1.0 = uniform); heads='scores': each head keeps at least max(window, round(floor*budget)) "
            "tokens", min=0.0, max=1.0),
        Arg("gamma", float, None, "heads='scores': share exponent, budget_h ~ (score_h + eps)^gamma (0 = uniform "
            "SnapKV; large = the top-scored heads fill to the prompt length first, like duo; default 1)", min=0.0,
            max=64.0, tune=Tunable("float", 0.0, 8.0, requires=("heads", "scores"))),
        Arg("headset", str, None, "heads='scores': the head scores, 'shipped' (the model's shipped retrieval head "
            "set, default), 'shipped:<method>' ('shipped:mass': the needle-mass set, 'shipped:duo') or a head-set file "
            "path (graphwright heads profile)"),
        Arg("eps", float, None, "heads='scores': added to every score before the power, so zero-score heads still "
            "share (default 0.01)", min=1e-6, max=1.0),
        Arg("split", str, "official", "heads='adaptive': the safeguard; official (FFY0/AdaKV: n_h <- round((1 - floor) "
            "* n_h + floor * C)) or kvpress (NVIDIA kvpress AdaKVPress: each head's top int(floor * budget) forced, "
            "window included, then the layer's global top)", choices=("official", "kvpress")),
        Arg("pyramid", float, None, "PyramidKV beta: linearly decreasing per-layer budgets with the same total "
            "(1 = uniform; the paper uses 20); packed cache", min=1.0, max=1e6),
        LAYERS_ARG,
    )

    also_on = RETRIEVAL_PART
    removes = EvictionPass.removes | {"retrieval_part"}

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
        if self.heads != "scores":
            given = [a for a in SCORE_ARGS if self.values.get(a) is not None]
            if given:
                raise RecipeError(f"snapkv: {', '.join(given)} set the heads='scores' budget shares; got heads="
                                  f"{self.heads!r} (pass heads='scores', or leave {', '.join(given)} out)")
        else:
            for a, default in SCORE_ARGS.items():
                if self.values.get(a) is None:
                    self.values[a] = default
            if self.pyramid is not None:
                raise RecipeError("snapkv: heads='scores' already spreads the budget over layers and heads; pyramid= "
                                  "is not combined with it (use one of them)")
        if self.split != "official" and self.heads != "adaptive":
            raise RecipeError(f"snapkv: split={self.split!r} is the Ada-KV safeguard rule and needs heads='adaptive'; "
                              f"got heads={self.heads!r}")

    @property
    def packed(self) -> bool:
        """Head-adaptive or pyramid budgets: the packed per-layer cache (``packed_rewrite``)."""
        return self.heads in ("adaptive", "scores") or self.pyramid is not None

    def applies_to(self, sg) -> str | None:
        duo = retrieval_layers(sg)
        if duo is not None and self.heads == "scores":
            return ("snapkv(heads='scores') after duo is not implemented (duo already decides per head who keeps "
                    "everything; the shares would spread over its retrieval heads only); use heads='adaptive' after duo")
        if duo is not None and self.pyramid is not None:  # heads='adaptive' packs the retrieval heads (packed_rewrite)
            return ("snapkv(pyramid=...) on duo's retrieval heads is not implemented (PyramidKV's layer schedule assumes "
                    "every layer evicts the same heads); use snapkv without pyramid after duo")
        return super().applies_to(sg)

    def run(self, sg, ctx: PassContext):
        params = {"budget": self.budget, "window": self.window, "kernel": self.kernel, "pool": self.pool}
        shares = None
        if self.heads == "scores":
            layers, shares = self._run_scores(sg, params)
        elif self.packed:
            params.update(adaptive=self.heads == "adaptive", floor=float(self.floor),
                          beta=float(self.pyramid) if self.pyramid is not None else 0.0, split=self.split)
            layers = rewrite_packed(sg, "snapkv", params, self.target_layers(sg))
        else:
            layers = rewrite_layers(sg, "snapkv", evict_pass_build(SNAPKV_POLICY, params), self.target_layers(sg))
        self.note_on_duo(sg, layers, "the retrieval heads' cache (prompt compressed once, decode appends)")
        sg.notes["snapkv"] = {
            "per_layer": {layer: {"budget": self.budget} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, **latent_settings(sg)},
            **({"shares": shares} if shares is not None else {}),
        }
        return sg

    def _run_scores(self, sg, params: dict):
        """heads='scores': weights from the head set, one ``evict_adakv_shares`` per layer (``head_shares.py``)."""
        info = sg.info
        layers = sorted(self.target_layers(sg))
        slots, weights = head_share_weights(self.headset, info, layers, float(self.gamma), float(self.eps))
        floor = max(self.window, int(round(self.floor * self.budget)))
        params.update(weights=weights, floor=floor)
        done = rewrite_packed(sg, "snapkv", params, set(layers), op=EVICT_ADAKV_SHARES, layer_args=False,
                              site_values=lambda _sg, site: {"slot": slots[site.layer]})
        return done, {"headset": self.headset, "gamma": float(self.gamma), "eps": float(self.eps), "floor_tokens": floor,
                      "weights": {layer: list(weights[i * info.num_kv_heads:(i + 1) * info.num_kv_heads])
                                  for i, layer in enumerate(layers)}}


SCORE_ARGS = {"gamma": 1.0, "headset": "shipped", "eps": 0.01}


def head_share_weights(headset: str, info, layers: list, gamma: float, eps: float,
                       who: str = "snapkv(heads='scores')") -> tuple[dict, list]:
    """({layer: slot}, flat weights): the head set's (score + eps)^gamma over the (layer, KV head) pairs of ``layers``
    in order, slot = the layer's index among them (``snapkv(heads='scores')``, ``evict(rule='scores')``)."""
    scores = resolve_scores(headset, info, who)
    weights = share_weights([scores[layer][h] for layer in layers for h in range(info.num_kv_heads)], gamma, eps)
    return {layer: i for i, layer in enumerate(layers)}, list(weights)


def resolve_scores(headset: str, info, who: str = "snapkv(heads='scores')") -> list:
    """[L][Hk] retrieval scores of ``headset`` ('shipped', 'shipped:<method>' or a file), checked against the model's shape; errors name
    ``who``, the recipe that asked."""
    from ..heads.headset import is_shipped_spec, load_headset, share_headset_file  # lazy: graphwright.heads holds the profilers
    from .duo_select import HOW_TO_MAKE, model_name

    if is_shipped_spec(headset):
        name = model_name(info)
        try:
            path = share_headset_file(name, headset) if name else None
        except ValueError as err:
            raise RecipeError(f"{who}: {err}") from None
        hs = load_headset(path) if path is not None else None
        if hs is None:
            model = name or f"{info.architecture} ({info.num_layers} layers x {info.num_kv_heads} KV heads)"
            which = "" if headset == "shipped" else f" ({headset!r})"
            raise RecipeError(f"{who}: no head set{which} ships for {model}; "
                              f"{HOW_TO_MAKE.replace('retrieval=', 'headset=')}")
    else:
        try:
            hs = load_headset(headset)
        except (FileNotFoundError, ValueError) as err:
            raise RecipeError(f"{who}: headset={headset!r}: {err} (headset is 'shipped', 'shipped:<method>' or a head-set "
                              "file)") from None
    try:
        hs.check_model(info.num_layers, info.num_kv_heads)
    except ValueError as err:
        raise RecipeError(f"{who}: headset={headset!r}: {err}") from None
    if any(s < 0 for row in hs.scores for s in row):
        raise RecipeError(f"{who}: headset={headset!r} holds negative scores; head-score shares need scores >= 0")
    return [list(row) for row in hs.scores]
