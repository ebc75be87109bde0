"""Per-layer sensitivity: a proxy that prunes a tuning trial before any of its windows is run.

Technique: the per-layer sensitivity probe of ``bench/lowrank_layer_sensitivity.py`` (one layer
compressed at a time, every other layer left mild, perplexity measured), generalised to any template
whose searched parameters are all per layer (``tune(scope="layer")``): ``lowrank_kv.keep``,
``streaming.window``, ``snapkv.budget``, ``h2o.heavy``/``recent``, ``evict.budget``. Issue 21 asks to
prune trials "from cheap proxies (per-layer sensitivity, short perplexity)"; this is the first,
the first-window perplexity (``pruning.reason``) the second.

``measure`` runs once per study, on the base model, when the study is created (its result is
stored with the dense scores, ``study.user_attrs["base"]["sensitivity"]``, so every worker reads
the same numbers): for each layer l it compiles the template with layer l's parameters at the low
end of their ranges (the least kept: budget, window, keep) and every other layer's at the high end
(the most kept: at the top of the per-context ranges nothing is dropped), scores the first
calibration window and keeps ``s_l = max(0, log(ppl ratio to dense))`` (a probe that scores better
than dense counts as 0: compression is never predicted to help).

``predicted_ppl_ratio`` (before a trial compiles anything): ``exp(sum_l d_l * s_l)`` with
``d_l`` in [0, 1] the mean, over layer l's parameters, of how far down its range the trial's value
lies (``(high - v) / (high - low)``, in log space for a log-scale range): each layer's measured
damage scaled linearly and added over layers (first order: layers assumed independent, which the
sum of single-layer damages over-estimates or under-estimates; it is a proxy, not a score).
``tune(max_predicted_ppl=X)`` prunes a trial whose prediction exceeds X (rule ``sensitivity``,
counted in ``pareto.json``) before its rewrite and evaluation.

Exact setting: ``max_predicted_ppl=None`` (off, the default). Every parameter at the high end of its
range predicts exactly 1.0, so such a trial is never pruned. The prediction reads only the trial's
parameters and the stored measure, so a parallel study prunes exactly what a serial one prunes
(unlike the ``front`` rule, which depends on which trials finished first).
Invariants tested (``tests/tuning/test_sensitivity.py``): the prediction's arithmetic; the stored
measure equals the probe recipes scored directly (tiny Llama, per-layer ``lowrank_kv``); a trial the
proxy predicts bad is pruned and never compiled while a mild one runs; spaces with a model-scope or
categorical parameter are refused with the reason.
"""

from __future__ import annotations

import math

from .space import recipe_for

RULE = "sensitivity"


def check_space(space: list) -> None:
    """ValueError unless every parameter is per layer and numeric (what the per-layer probe can set)."""
    for p in space:
        if p.scope != "layer" or p.kind not in ("int", "float"):
            raise ValueError(f"the sensitivity proxy (max_predicted_ppl) needs every searched parameter per layer and numeric "
                             f"(tune it with scope='layer'); {p.name} is a {p.scope}-scope {p.kind} parameter")


def _ends(space: list, layer: int) -> dict:
    """Layer ``layer``'s parameters at the low end of their ranges, every other parameter at the high end."""
    return {p.name: (p.low if p.layer == layer else p.high) for p in space}


def probe_recipes(template, space: list) -> dict:
    """``{layer: recipe}``: the template with only that layer at the low end of its ranges."""
    check_space(space)
    layers = sorted({p.layer for p in space})
    return {layer: recipe_for(template, space, _ends(space, layer)) for layer in layers}


def measure(ev, base: dict, template, space: list) -> dict:
    """The per-layer sensitivity of ``template`` on ``ev``'s first window (plain data, stored once per study)."""
    rows = []
    for layer, recipe in probe_recipes(template, space).items():
        m = ev.first_window(recipe, base)
        rows.append({"layer": layer, "recipe": str(recipe), "ppl_ratio": m["ppl_ratio"], "kv_fraction": m["kv_fraction"],
                     "log_ratio": max(0.0, math.log(m["ppl_ratio"]))})
    return {"rows": rows, "probe": "layer l at the low end of its ranges, every other layer at the high end; "
                                    "first calibration window; log_ratio = max(0, log(ppl ratio))"}


def _deficit(p, v) -> float:
    lo, hi, v = float(p.low), float(p.high), float(v)
    if p.log:
        lo, hi, v = math.log(lo), math.log(hi), math.log(v)
    return min(1.0, max(0.0, (hi - v) / (hi - lo)))


def predicted_ppl_ratio(sensitivity: dict, space: list, values: dict) -> float:
    """``exp(sum_l d_l * s_l)`` (module docstring) for a trial's parameter ``values``."""
    s = {r["layer"]: r["log_ratio"] for r in sensitivity["rows"]}
    by_layer: dict = {}
    for p in space:
        if p.layer not in s:
            raise ValueError(f"the stored sensitivity has no layer {p.layer} (parameter {p.name}); it measured layers {sorted(s)}")
        by_layer.setdefault(p.layer, []).append(_deficit(p, values[p.name]))
    return math.exp(sum(s[layer] * sum(d) / len(d) for layer, d in by_layer.items()))
