"""``evict``: KV eviction as data -- a scorer, a schedule and a budget rule (issue 20 item 1).

``evict(score=..., when=..., budget=..., rule=..., sinks=..., window=..., pool=..., ...)`` inserts
the generic scored eviction op (``ops/policy_scored.py``) after every chosen layer's attention:

* ``score``: a scorer of ``ops/scorers`` (``snapkv``, ``h2o`` = cumulative attention, ``knorm``,
  ``tova``, ``keydiff``, ``expected_attention``) or ``chunkkv`` (SnapKV scores in chunks of 20;
  ``chunk=N`` wraps any scorer), or a name in ``DELEGATES`` (policies with their own op);
* ``when``: ``"prefill"`` (once after the prompt), ``"decode"`` (after prefill and every step),
  ``"every:N"`` or ``every=N`` (after prefill and at decode steps where the row's length is a
  multiple of N), ``"overflow"`` (when a head holds more than budget + ``slack``: back to budget);
  default: the scorer's own (TOVA and H2O every step, the others after prefill);
* ``budget``: tokens per KV head (int) or a fraction of the row's current length (float),
  sinks and window included; ``rule``: ``"fixed"``, ``"pyramid"`` (PyramidKV layer budgets,
  arXiv 2406.02069, ``beta``, the paper's 20) or ``"adaptive"`` (Ada-KV, arXiv 2407.11550: only
  with SnapKV after prefill, run by ``snapkv(heads="adaptive")``'s packed path);
* ``sinks`` (first positions always kept), ``window`` (recent tokens always kept; SnapKV's
  observation window), ``pool`` (GQA mean|max), ``kernel``/``smooth`` (SnapKV's 1-D pooling),
  ``chunk``/``chunk_heads`` (ChunkKV), ``n_future``/``eps`` (Expected Attention), ``slack``.

Keys stay post-RoPE at their original positions: positions travel with the cache as per-head
``k_pos`` and attention masks by them, so eviction never re-rotates keys (the issue's
"re-rotation when keys are kept by cache index" is StreamingLLM's separate choice, ``streaming``).

Presets keep their own passes, ops and fast paths: ``snapkv(budget=B, window=w)`` is
``evict(score="snapkv", when="prefill", budget=B, window=w)`` and ``h2o(heavy=H, recent=R)``
(counts) is ``evict(score="h2o", when="decode", budget=H+R, window=R)``: same kept sets (tested).
Adding a policy that has its own pass (Keyformer, Scissorhands) to ``evict`` is one entry in
the ``DELEGATES`` literal below: ``"keyformer": lambda a: Keyformer(budget=a["budget"], ...)`` (``a`` =
this pass's argument values); the name joins the ``score`` choices and ``run`` delegates to that pass.

Refused with the reason: a scorer that needs the prompt's queries (SnapKV window, Expected
Attention statistics) on a schedule other than ``prefill``; arguments a scorer does not read;
``adaptive`` outside SnapKV-after-prefill; Expected Attention on latent (``lowrank_kv``) layers.
Exact setting: a fraction budget >= 1.0. Backends: ``reference``/``torch`` run the op; the
``compiled`` backend keeps it outside its static decode buffers ("no static decode translation");
ONNX export splits it to the runtime side like every eviction op.

Invariants tested (``tests/passes/test_evict_scorers.py``): identity at budget=1.0 on tiny Llama
and Qwen2 (logits and 32 greedy tokens); SnapKV/H2O equivalences; schedules; composition with
``lowrank_kv`` and ``steer``; refusals.
"""

from __future__ import annotations

from typing import Callable

from ..errors import RecipeError
from ..ops.policy_scored import policy_for
from ..ops.scorers import CHUNKKV, SCORERS
from .base import MAX_TOKENS, Arg, PassContext, Tunable, register_pass
from .eviction_common import LAYERS_ARG, EvictionPass, find_sites, frac_or_count, insert_policy, latent_settings, rewrite_layers
from .streaming import find_rotary

DELEGATES: dict[str, Callable] = {}  # score name -> (evict argument values -> Pass): policies with their own op
CHUNKKV_CHUNK = 20  # kvpress ChunkKVPress default


def parse_when(when, every) -> tuple[str | None, int]:
    """("prefill"|"decode"|"every"|"overflow"|None, N) from ``when`` and ``every``; RecipeError when they disagree."""
    n = 0
    if isinstance(when, str) and when.startswith("every"):
        tail = when[len("every"):]
        if tail.startswith(":"):
            if not tail[1:].isdigit() or int(tail[1:]) < 1:
                raise RecipeError(f"evict: when={when!r}: N in 'every:N' must be an integer >= 1")
            n = int(tail[1:])
        elif tail:
            raise RecipeError(f"evict: when={when!r}; allowed: 'prefill', 'decode', 'every:N' (or every=N), 'overflow'")
        when = "every"
    elif when is not None and when not in ("prefill", "decode", "overflow"):
        raise RecipeError(f"evict: when={when!r}; allowed: 'prefill', 'decode', 'every:N' (or every=N), 'overflow'")
    if every is not None:
        if when not in (None, "every") or (n and n != every):
            raise RecipeError(f"evict: every={every} contradicts when={when!r}; give when='every:{every}' or every={every} alone")
        when, n = "every", every
    if when == "every" and not n:
        raise RecipeError("evict: when='every' needs N: when='every:N' or every=N")
    return when, n


@register_pass
class Evict(EvictionPass):
    name = "evict"
    examples = {"exact": "evict(score='tova', budget=1.0)", "lossy": "evict(score='tova', when='decode', budget=6)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"), "first_token_dense": True}
    exact = False
    doc = "KV eviction as scorer x schedule x budget rule: evict(score='tova', when='decode', budget=0.25)."
    args = (
        Arg("score", str, None, "what each cached token is worth (required)",
            choices=tuple(sorted(SCORERS)) + (CHUNKKV,) + tuple(sorted(DELEGATES))),
        Arg("budget", (int, float), None, "tokens kept per KV head (int) or fraction of the row's length (float), "
            "sinks and window included (required)", min=0, max=MAX_TOKENS,
            tune=Tunable("float", 0.05, 0.95)),
        Arg("when", str, None, "prefill | decode | every:N | overflow (default: the scorer's own)"),
        Arg("every", int, None, "evict at decode steps where the row length is a multiple of N", min=1, max=MAX_TOKENS),
        Arg("rule", str, "fixed", "budget rule", choices=("fixed", "pyramid", "adaptive")),
        Arg("beta", float, None, "PyramidKV beta (rule='pyramid'; default 20)", min=1.0, max=1e6),
        Arg("floor", float, None, "Ada-KV safeguard alpha (rule='adaptive'; default 0.2)", min=0.0, max=1.0),
        Arg("sinks", int, None, "first positions always kept (default 0; expected_attention 4)", min=0, max=MAX_TOKENS),
        Arg("window", int, None, "recent tokens always kept (snapkv: the observation window, default "
            "min(32, budget // 2)); default 0", min=0, max=MAX_TOKENS),
        Arg("pool", str, None, "GQA pooling over a KV head's query heads", choices=("mean", "max")),
        Arg("kernel", int, None, "snapkv 1-D pooling width (odd, default 5)", min=1, max=1023),
        Arg("smooth", str, None, "snapkv 1-D pooling (default avg)", choices=("avg", "max")),
        Arg("chunk", int, None, "ChunkKV chunk size (chunkkv: 20)", min=1, max=MAX_TOKENS),
        Arg("chunk_heads", str, None, "ChunkKV: sum chunk scores over KV heads (one set) or each head", choices=("sum", "each")),
        Arg("n_future", int, None, "expected_attention: future positions averaged (default 512)", min=1, max=1 << 20),
        Arg("eps", float, None, "expected_attention: added to p before the value norm (default 0)", min=0.0, max=1e6),
        Arg("slack", int, None, "overflow: evict when a head holds more than budget + slack (default 0)", min=0, max=MAX_TOKENS),
        LAYERS_ARG,
    )

    def __init__(self, **values):
        super().__init__(**values)
        v = self.values
        for name in ("score", "budget"):
            if v[name] is None:
                raise RecipeError(f"evict: argument {name!r} is required, e.g. evict(score='tova', when='decode', budget=0.25)")
        if isinstance(self.budget, bool) or self.budget <= 0:
            raise RecipeError(f"evict: budget={self.budget!r} must be > 0 (int tokens per head or a float fraction)")
        self.delegate = None
        if self.score in DELEGATES:
            self.delegate = DELEGATES[self.score](dict(v))
            return
        chunkkv = self.score == CHUNKKV
        self.scorer = SCORERS["snapkv" if chunkkv else self.score]
        s = self.scorer
        when, self.every_n = parse_when(self.when, self.every)
        self.mode = when or s.default_when
        if s.prefill_only and self.mode != "prefill":
            raise RecipeError(f"evict: score={self.score!r} needs the prompt's queries ({s.rule}), so it runs only "
                              f"when='prefill'; got when={self.mode!r}. For per-step eviction use score='tova' "
                              "(last query) or 'h2o' (cumulative attention), or a key-only scorer ('knorm', 'keydiff')")
        self._refuse_unused(v, s, chunkkv)
        n, f = frac_or_count(self.budget)
        window = v["window"]
        if window is None:
            window = (min(32, max(1, n // 2)) if n else 32) if s.name == "snapkv" else 0
        if s.name == "snapkv" and window < 1:
            raise RecipeError("evict: score='snapkv' needs window >= 1 (the observation window of prompt queries)")
        if n and window + (v["sinks"] or 0) > n:
            raise RecipeError(f"evict: sinks + window = {window + (v['sinks'] or 0)} exceed budget={n}; "
                              f"keep them <= budget")
        chunk = v["chunk"] or (CHUNKKV_CHUNK if chunkkv else 0)
        self.params = {
            "scorer": s.name, "when": self.mode, "every": self.every_n, "slack": v["slack"] or 0,
            "budget_n": n, "budget_f": f, "sinks": s.default_sinks if v["sinks"] is None else v["sinks"],
            "window": window, "kernel": v["kernel"] or 5, "smooth": v["smooth"] or "avg", "pool": v["pool"] or "mean",
            "chunk": chunk, "chunk_heads": v["chunk_heads"] or "sum", "beta": 0.0, "layer": 0, "num_layers": 1,
            "n_future": v["n_future"] or 512, "eps": v["eps"] or 0.0, "rope_scaling": 1.0,
        }
        if self.rule == "pyramid":
            self.params["beta"] = float(v["beta"] if v["beta"] is not None else 20.0)
        if self.rule == "adaptive":
            self.delegate = self._adaptive(v, n)

    def _refuse_unused(self, v, s, chunkkv):
        def no(arg, why):
            if v[arg] is not None:
                raise RecipeError(f"evict: {arg}= is not read by score={self.score!r} ({why}); leave it out")
        if not s.gqa_pool:
            no("pool", "it has no per-query-head scores to pool" if not s.shared else "TOVA averages over all heads")
        if not s.smoothing:
            no("kernel", "only snapkv smooths its scores")
            no("smooth", "only snapkv smooths its scores")
        if s.name != "expected_attention":
            no("n_future", "only expected_attention averages future rotations")
            no("eps", "only expected_attention")
        if not (chunkkv or v["chunk"]):
            no("chunk_heads", "it applies to chunk= / chunkkv only")
        if self.mode != "overflow":
            no("slack", "slack applies to when='overflow'")
        if self.rule != "pyramid":
            no("beta", "beta applies to rule='pyramid'")
        if self.rule != "adaptive":
            no("floor", "floor applies to rule='adaptive'")
        if v["kernel"] is not None and v["kernel"] % 2 == 0:
            raise RecipeError(f"evict: kernel={v['kernel']} must be odd (centred pooling)")

    def _adaptive(self, v, n):
        """Ada-KV: only as SnapKV after prefill, through ``snapkv(heads='adaptive')``'s packed cache."""
        if self.score != "snapkv" or self.mode != "prefill" or not n or v["sinks"] or v["chunk"] or v["pool"] == "max":
            raise RecipeError("evict: rule='adaptive' (Ada-KV, arXiv 2407.11550) is implemented for score='snapkv', "
                              "when='prefill', an int budget, no sinks, no chunks and pool='mean' (it runs "
                              "snapkv(heads='adaptive')'s packed cache); other scorers would need that packed path per "
                              f"scorer and step. Got score={self.score!r}, when={self.mode!r}, budget={self.budget!r}")
        from .snapkv import SnapKV

        return SnapKV(budget=n, window=self.params["window"], kernel=self.params["kernel"], pool=self.params["smooth"],
                      heads="adaptive", floor=0.2 if v["floor"] is None else v["floor"], layers=v["layers"])

    def is_identity(self) -> bool:
        return isinstance(self.budget, float) and self.budget >= 1.0

    def applies_to(self, sg) -> str | None:
        if self.delegate is not None:
            return self.delegate.applies_to(sg)
        why = super().applies_to(sg)
        if why or not self.scorer.rope:
            return why
        sites = find_sites(sg, self.layer_set(sg.info))
        if any(s.latent for s in sites):
            return ("evict(score='expected_attention') scores with per-head value norms, and latent (lowrank_kv) layers "
                    "hold one shared latent payload per token; evict those layers with another scorer")
        rot = find_rotary(sg.gm)
        return rot if isinstance(rot, str) else None

    def run(self, sg, ctx: PassContext):
        if self.delegate is not None:
            sg = self.delegate.run(sg, ctx)
            sg.notes["evict"] = {"settings": dict(self.values), "delegated_to": self.delegate.name,
                                 "counts": {"layers_evicted": len(self.layer_set(sg.info))}}
            return sg
        why = self.applies_to(sg)
        if why:
            raise RecipeError(f"evict: {why}")
        policy = policy_for(self.scorer.name)
        num_layers = sg.info.num_layers

        def build(sg, ed, site, kp_all):
            params = dict(self.params, layer=site.layer, num_layers=num_layers)
            inputs = {}
            if self.scorer.rope:
                inv, scaling = find_rotary(sg.gm, site.attn)
                params["rope_scaling"] = float(scaling)
                inputs["inv_freq"] = inv
            return insert_policy(sg, ed, site, policy, params, **inputs)

        layers = rewrite_layers(sg, f"evict_{self.scorer.name}", build, self.layer_set(sg.info))
        sg.notes["evict"] = {
            "per_layer": {layer: {"budget": self.budget} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, "scorer": self.scorer.name, "paper": self.scorer.paper, "when": self.mode,
                         "every": self.every_n, "rule_text": self.scorer.rule, **latent_settings(sg)},
        }
        return sg
