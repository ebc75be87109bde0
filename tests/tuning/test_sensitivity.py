"""The per-layer sensitivity proxy of graphwright.tune: measured once per study, prunes a trial before it runs."""

from __future__ import annotations

import math

import pytest

from graphwright.eval.bytetok import ByteTokenizer
from graphwright.models import load_model
from graphwright.recipes import Recipe
from graphwright.tuning.objectives import Evaluator
from graphwright.tuning.report import trial_counts
from graphwright.tuning.sensitivity import check_space, measure, predicted_ppl_ratio, probe_recipes
from graphwright.tuning.space import search_space
from graphwright.tuning.study import tune

SMALL = {"windows": 1, "window": 40, "prefix": 20}
TOK = ByteTokenizer()
TEMPLATE = "lowrank_kv(scaling=none)"


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


def test_the_prediction_scales_each_layer_s_damage_by_how_far_down_its_range_the_trial_is():
    space = search_space(TEMPLATE, 20, scope="layer", num_layers=2)  # keep in [0.1, 1.0] per layer
    sens = {"rows": [{"layer": 0, "log_ratio": 0.2}, {"layer": 1, "log_ratio": 0.1}]}
    keep = lambda a, b: {"0.lowrank_kv.keep.L0": a, "0.lowrank_kv.keep.L1": b}  # noqa: E731
    assert predicted_ppl_ratio(sens, space, keep(1.0, 1.0)) == 1.0  # the high end: never pruned
    assert predicted_ppl_ratio(sens, space, keep(0.1, 0.1)) == pytest.approx(math.exp(0.3))
    assert predicted_ppl_ratio(sens, space, keep(0.55, 1.0)) == pytest.approx(math.exp(0.1))  # half-way down layer 0
    h2o = search_space("h2o", 100, scope="layer", num_layers=2)  # two parameters per layer: their mean deficit
    lo_hi = {p.name: (p.low if p.arg == "heavy" else p.high) for p in h2o}
    assert predicted_ppl_ratio(sens, h2o, lo_hi) == pytest.approx(math.exp(0.5 * 0.2 + 0.5 * 0.1))
    assert [str(r) for r in probe_recipes(TEMPLATE, space).values()] == [str(Recipe.parse('lowrank_kv(keep=[0.1, 1.0], scaling="none")')),
                                                                         str(Recipe.parse('lowrank_kv(keep=[1.0, 0.1], scaling="none")'))]
    with pytest.raises(ValueError, match="needs every searched parameter per layer and numeric .* 0.snapkv.budget is a model-scope int"):
        check_space(search_space("snapkv", 100))
    with pytest.raises(ValueError, match="0.duo.retrieval.L0.H0 is a head-scope categorical"):
        check_space(search_space("duo(window=8)", 100, scope="head", num_layers=2, num_kv_heads=2))


def test_a_trial_the_proxy_predicts_bad_is_pruned_without_being_compiled(llama, tmp_path, monkeypatch):
    template = "streaming(sinks=2)"  # per-layer windows in [1, 20] at a 20-token prefix
    ev = Evaluator(llama, TOK, **SMALL)
    base = ev.base()
    space = search_space(template, SMALL["prefix"], scope="layer", num_layers=2)
    sens = measure(ev, base, template, space)
    assert [r["recipe"] for r in sens["rows"]] == [str(r) for r in probe_recipes(template, space).values()]
    for row in sens["rows"]:  # the probed layer holds sinks + 1 of the 39 dense tokens, the other sinks + 20
        assert row["kv_fraction"] == pytest.approx((3 + 22) / 78)
        assert row["log_ratio"] == max(0.0, math.log(row["ppl_ratio"]))
    # the random tiny model's perplexity *drops* under compression (ratio < 1): measured damage is clamped to 0,
    # so the proxy never prunes here; the pruning path below runs on a stored measure with damage set per layer
    assert all(row["ppl_ratio"] < 1 and row["log_ratio"] == 0.0 for row in sens["rows"])
    good = {"0.streaming.window.L0": 20, "0.streaming.window.L1": 20}
    bad = {"0.streaming.window.L0": 1, "0.streaming.window.L1": 1}
    assert predicted_ppl_ratio(sens, space, bad) == 1.0
    import graphwright.tuning.sensitivity as sensitivity

    def damaged(ev_, base_, template_, space_):  # the real measure (probe recipes compiled and scored), then damage set
        got = sensitivity_measure(ev_, base_, template_, space_)
        for row, log_ratio in zip(got["rows"], (0.2, 0.1)):
            row["log_ratio"] = log_ratio
        return got

    sensitivity_measure = sensitivity.measure
    monkeypatch.setattr(sensitivity, "measure", damaged)
    sens = {"rows": [{**row, "log_ratio": x} for row, x in zip(sens["rows"], (0.2, 0.1))]}
    predicted_bad = predicted_ppl_ratio(sens, space, bad)
    assert predicted_bad == pytest.approx(math.exp(0.3))
    cap = math.sqrt(predicted_bad)  # between the mild trial's 1.0 and the bad one's prediction

    compiled = []
    real = Evaluator.compiled

    def recording(self, recipe):
        compiled.append(None if recipe is None else Recipe.parse(recipe))
        return real(self, recipe)

    monkeypatch.setattr(Evaluator, "compiled", recording)
    r = tune(llama, TOK, template=template, budget=1.0, trials=2, population=2, out=tmp_path, eval_settings=SMALL, scope="layer",
             enqueue=[good, bad], max_predicted_ppl=cap, outputs=False)
    stored = r["base"]["sensitivity"]["rows"]  # measured once, at study creation, with the dense scores (seeded: same numbers)
    assert [(s["layer"], s["recipe"]) for s in stored] == [(s["layer"], s["recipe"]) for s in sens["rows"]]
    assert [s["ppl_ratio"] for s in stored] == pytest.approx([s["ppl_ratio"] for s in sens["rows"]], rel=1e-9)
    t0, t1 = r["trials"]
    assert (t0["params"], t0["state"], t0["predicted_ppl_ratio"]) == (good, "COMPLETE", 1.0)
    assert t0["kv_fraction"] == pytest.approx(22 / 39)
    assert (t1["params"], t1["state"], t1["pruned_by"]) == (bad, "PRUNED", "sensitivity")
    assert t1["predicted_ppl_ratio"] == pytest.approx(predicted_bad)
    assert "windows_scored" not in t1 and "proxy_ppl_ratio" not in t1  # no window ran
    bad_recipe = Recipe.parse("streaming(sinks=2, window=[1, 1])")
    assert Recipe.parse(t1["recipe"]) == bad_recipe and bad_recipe not in compiled  # never even rewritten
    assert Recipe.parse(t0["recipe"]) in compiled
    assert trial_counts(r["trials"])["pruned_by"] == {"sensitivity": 1}


def test_the_proxy_is_refused_where_it_cannot_predict(llama, tmp_path):
    with pytest.raises(ValueError, match="the sensitivity proxy .* needs every searched parameter per layer"):
        tune(llama, TOK, template="snapkv", max_predicted_ppl=1.2, out=tmp_path / "a", outputs=False, eval_settings=SMALL)
    with pytest.raises(ValueError, match="max_predicted_ppl is a perplexity ratio to dense, >= 1"):
        tune(llama, TOK, template="snapkv", scope="layer", max_predicted_ppl=0.5, out=tmp_path / "b", outputs=False)
