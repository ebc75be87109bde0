"""graphwright.tune on tiny-llama: per-layer scope, decode speed objective and floor (fake measure), front-based proxy pruning."""

from __future__ import annotations

import json

import pytest

from graphwright.compile import compile as gw_compile
from graphwright.errors import RecipeError
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.models import load_model
from graphwright.recipes import Recipe
from graphwright.tuning.objectives import Evaluator
from graphwright.tuning.pruning import reason
from graphwright.tuning.space import recipe_for, search_space
from graphwright.tuning.study import tune

SMALL = {"windows": 1, "window": 40, "prefix": 20}
TOK = ByteTokenizer()
DENSE = 39  # tokens a dense layer holds after the last decode step of a 40-token window


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


def test_layer_scope_gives_one_parameter_per_layer_and_one_pass_per_layer():
    space = search_space("snapkv(window=4) + h2o(layers=[1])", 100, scope="layer", num_layers=3)
    assert [p.name for p in space] == ["0.snapkv.budget.L0", "0.snapkv.budget.L1", "0.snapkv.budget.L2",
                                       "1.h2o.heavy.L1", "1.h2o.recent.L1"]
    assert all(p.scope == "layer" for p in space) and [p.layer for p in space] == [0, 1, 2, 1, 1]
    values = {"0.snapkv.budget.L0": 7, "0.snapkv.budget.L1": 9, "0.snapkv.budget.L2": 11, "1.h2o.heavy.L1": 0.1, "1.h2o.recent.L1": 0.2}
    r = recipe_for("snapkv(window=4) + h2o(layers=[1])", space, values)
    assert r == Recipe.parse("snapkv(budget=7, layers=[0], window=4) + snapkv(budget=9, layers=[1], window=4) + "
                             "snapkv(budget=11, layers=[2], window=4) + h2o(heavy=0.1, layers=[1], recent=0.2)")
    # a mapping scopes one pass; the other keeps one value for the model
    mixed = search_space("snapkv + lowrank_kv", 100, scope={"snapkv": "layer"}, num_layers=2)
    assert [(p.name, p.layer) for p in mixed] == [("0.snapkv.budget.L0", 0), ("0.snapkv.budget.L1", 1), ("1.lowrank_kv.keep", None)]


def test_layer_scope_refusals_say_why():
    with pytest.raises(RecipeError, match="think cannot be tuned per layer: its keep is declared for the whole model"):
        search_space("think", 100, scope="layer", num_layers=2)
    with pytest.raises(RecipeError, match="steer cannot be tuned per layer: .*no head-count argument"):
        search_space("steer(heads=all)", 100, scope="layer", num_layers=2)
    with pytest.raises(ValueError, match="layer scope needs the model's layer count"):
        search_space("snapkv", 100, scope="layer")
    with pytest.raises(RecipeError, match="lowrank_kv cannot be tuned per head: none of its tunable arguments is declared per KV head"):
        search_space("lowrank_kv", 100, scope="head", num_layers=2, num_kv_heads=2)
    with pytest.raises(RecipeError, match="snapkv cannot be tuned per head"):  # its per-head split heads= fixed by the template
        search_space('snapkv(heads="uniform")', 100, scope="head", num_layers=2, num_kv_heads=2)
    with pytest.raises(RecipeError, match="duo cannot be tuned per layer: .*tune it at scope 'head'"):
        search_space("duo", 100, scope="layer", num_layers=2)
    with pytest.raises(ValueError, match="scope of 'snapkv' must be one of"):
        search_space("snapkv", 100, scope="row", num_layers=2)
    with pytest.raises(ValueError, match="scope names pass 'h2o', which the template does not hold"):
        search_space("snapkv", 100, scope={"h2o": "layer"}, num_layers=2)
    with pytest.raises(RecipeError, match="layers=.*out of range|layer"):
        search_space("snapkv(layers=[5])", 100, scope="layer", num_layers=2)


def test_layer_scope_study_fronts_round_trip_through_compile(llama, tmp_path):
    r = tune(llama, TOK, template="snapkv", budget=0.95, trials=3, population=3, out=tmp_path, eval_settings=SMALL,
             scope="layer", prune_margin=None)
    done = [t for t in r["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 3
    for t in done:  # per layer: min(budget, 20) prompt tokens kept after prefill, plus the 19 decoded ones; dense 39 per layer
        b0, b1 = t["params"]["0.snapkv.budget.L0"], t["params"]["0.snapkv.budget.L1"]
        assert t["recipe"] == f"snapkv(budget={b0}, layers=[0]) + snapkv(budget={b1}, layers=[1])"
        assert t["kv_fraction"] == pytest.approx((min(b0, 20) + min(b1, 20) + 2 * 19) / (2 * DENSE))
    assert any(t["params"]["0.snapkv.budget.L0"] != t["params"]["0.snapkv.budget.L1"] for t in done)  # layers differ
    assert r["pareto"]
    for p in r["pareto"]:
        cm = gw_compile(llama, recipe=p["toml"], tokenizer=TOK)  # the TOML each Pareto point writes is what compile() takes
        assert cm.recipe == Recipe.parse(p["recipe"])
    assert r["winner"]["recipe"] == min(r["pareto"], key=lambda p: (p["ppl_ratio"], p["kv_fraction"], p["number"]))["recipe"]


class FakeSpeed:
    """Decode tokens/s as a function of the recipe (no clock): dense 50, streaming 1000 / (10 + window)."""

    def __init__(self):
        self.calls = []

    def __call__(self, cm, ids, steps):
        self.calls.append((str(cm.recipe), int(ids.shape[1]), steps))
        (entry,) = cm.recipe.to_list() if cm.recipe.passes else [None]
        return 50.0 if entry is None else 1000.0 / (10 + entry["window"])


def test_speed_objective_and_floor_with_an_injected_measure(llama, tmp_path):
    fake = FakeSpeed()
    r = tune(llama, TOK, template="streaming(sinks=4)", budget=0.9, trials=4, population=4, out=tmp_path, eval_settings=SMALL,
             objectives=("kv", "ppl", "speed"), min_speed=0.9, speed_steps=5, speed_rounds=2, measure=fake, prune_margin=None)
    done = [t for t in r["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 4
    for t in done:
        want = (1000.0 / (10 + t["params"]["0.streaming.window"])) / 50.0
        assert t["speed_ratio"] == pytest.approx(want)
        assert t["values"] == [t["kv_fraction"], t["ppl_ratio"], t["speed_ratio"]]  # speed is the third objective (maximised)
    # every measure: dense then candidate, warm-up then 2 alternating rounds, on the 20-token prefix, 5 steps
    per_trial = [fake.calls[i:i + 6] for i in range(0, len(fake.calls), 6)]
    assert len(per_trial) == 4
    for calls, t in zip(per_trial, done):
        assert [c[0] for c in calls] == ["identity", t["recipe"]] * 3 and all(c[1:] == (20, 5) for c in calls)
    # the floor (speed ratio 20 / (10 + window) >= 0.9: window <= 12) is a constraint: slower trials are infeasible and off the front
    import optuna

    from graphwright.tuning.study import STUDY_NAME, _storage

    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(tmp_path))
    for t in study.trials:  # Optuna's set_constraint stores "constraints:<name>" (feasible when <= 0)
        assert t.system_attrs["constraints:speed_floor"] == pytest.approx(0.9 - t.user_attrs["speed_ratio"])
        assert t.system_attrs["constraints:kv_budget"] == pytest.approx(t.user_attrs["kv_fraction"] - 0.9)
    slow = [t for t in done if t["speed_ratio"] < 0.9]
    fast = [t for t in done if t["speed_ratio"] >= 0.9]
    assert slow and fast  # the seeded design has both (the test needs both to mean anything)
    assert {p["number"] for p in r["pareto"]} <= {t["number"] for t in fast}
    assert "speed / dense" in (tmp_path / "pareto.md").read_text()
    with pytest.raises(ValueError, match="objectives must hold 'kv' and 'ppl'"):
        tune(llama, TOK, template="streaming", objectives=("ppl", "speed"), out=tmp_path / "x")
    with pytest.raises(ValueError, match="min_speed is a decode tokens/s ratio"):
        tune(llama, TOK, template="streaming", min_speed=-1, out=tmp_path / "x")
    with pytest.raises(ValueError, match="measure= runs in this process only"):
        tune("tiny-llama", TOK, template="streaming", workers=2, measure=fake, out=tmp_path / "x")


def test_proxy_rule_prunes_only_what_is_worse_than_a_completed_trial_by_the_margin():
    budget, cap, margin = 0.5, 2.0, 0.1
    done = [(0, 0.3, 1.0)]  # (trial number, first-window KV fraction, first-window perplexity ratio)
    assert reason(0.6, 1.0, budget, cap, margin, done)[0] == "budget"
    assert reason(0.3, 2.5, budget, cap, margin, done)[0] == "ppl_cap"
    assert reason(0.3, 1.11, budget, cap, margin, done)[0] == "front"
    assert reason(0.3, 1.09, budget, cap, margin, done) is None  # within the margin
    assert reason(0.29, 1.5, budget, cap, margin, done) is None  # holds less KV: not dominated
    assert reason(0.3, 1.5, budget, cap, None, done) is None  # rule off


def test_a_trial_known_to_be_bad_is_pruned_before_its_full_evaluation(llama, tmp_path):
    """Same KV fraction, first-window perplexity > 10% worse than a completed trial: pruned after one window, counted in pareto.json."""
    good, bad = {"0.h2o.heavy": 0.3, "0.h2o.recent": 0.05}, {"0.h2o.heavy": 0.05, "0.h2o.recent": 0.3}
    ev = Evaluator(llama, TOK, **SMALL)  # the first window alone: what the proxy sees
    base = ev.base()
    g = ev.evaluate("h2o(heavy=0.3, recent=0.05)", base=base)
    b = ev.evaluate("h2o(heavy=0.05, recent=0.3)", base=base)
    assert g["kv_fraction"] <= b["kv_fraction"] and b["ppl_ratio"] > 1.1 * g["ppl_ratio"]  # known bad, measured here
    fake = FakeSpeed()
    fake_h2o = lambda cm, ids, steps: fake.calls.append(str(cm.recipe)) or 10.0  # noqa: E731
    r = tune(llama, TOK, template="h2o", budget=0.9, trials=2, population=2, out=tmp_path, eval_settings={**SMALL, "windows": 2},
             enqueue=[good, bad], prune_margin=0.1, objectives=("kv", "ppl", "speed"), measure=fake_h2o, speed_rounds=1)
    t0, t1 = r["trials"]
    assert (t0["params"], t0["state"], t0["windows_scored"]) == (good, "COMPLETE", 2)
    assert (t1["params"], t1["state"], t1["pruned_by"], t1["windows_scored"]) == (bad, "PRUNED", "front", 1)
    assert t1["proxy_ppl_ratio"] == pytest.approx(b["ppl_ratio"]) and "ppl" not in t1  # only the first window ran
    assert t1["recipe"] not in fake.calls and t0["recipe"] in fake.calls  # no speed measure for the pruned trial
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["counts"]["pruned"] == 1 and saved["counts"]["pruned_by"] == {"front": 1} and saved["counts"]["complete"] == 1
    assert [p["number"] for p in saved["front"]] == [0]


def test_cli_scope_layer_and_speed_objective(tmp_path, capsys):
    from graphwright.cli.main import main

    argv = ["tune", "--model", "tiny-llama", "--recipe", "snapkv", "--kv-budget", "0.95", "--trials", "2", "--population", "2",
            "--windows", "1", "--window", "40", "--prefix", "20", "--scope", "layer", "--objectives", "kv,ppl,speed",
            "--speed-steps", "2", "--speed-rounds", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "Pareto front: 2 points" in capsys.readouterr().out
    assert "speed / dense" in (tmp_path / "pareto.md").read_text()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["settings"]["scope"] == "layer" and result["settings"]["objectives"] == ["kv", "ppl", "speed"]
    assert result["settings"]["prune_margin"] is None
    for t in result["trials"]:  # measured speed ratios are positive numbers (their values depend on the load: not asserted)
        assert t["state"] == "COMPLETE" and t["speed_ratio"] > 0 and len(t["values"]) == 3
        assert Recipe.parse(t["recipe"]).to_list() == [{"pass": "snapkv", "budget": t["params"][f"0.snapkv.budget.L{i}"], "layers": [i]}
                                                       for i in (0, 1)]
    with pytest.raises(SystemExit) as bad:  # argparse's one-line error
        main([*argv[:-1], str(tmp_path / "b"), "--objectives", "kv,speed"])
    assert bad.value.code == 2
    assert "objectives must list kv and ppl" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "c"), "--recipe", "block_sparse"]) == 2
    assert "block_sparse cannot be tuned per layer" in capsys.readouterr().err


@pytest.mark.parametrize("template", ["h2o", "evict(score=snapkv)"])
def test_layer_scope_recipes_of_every_per_layer_pass_compile(llama, template):
    """Both ends of each per-layer range, a different end per layer: the per-layer recipe compiles and each layer keeps its own setting."""
    space = search_space(template, 20, scope="layer", num_layers=2)
    values = {p.name: (p.low if p.layer == 0 else p.high) for p in space}
    r = recipe_for(template, space, values)
    assert [e["layers"] for e in r.to_list()] == [[0], [1]]
    cm = gw_compile(llama, recipe=r, tokenizer=TOK)
    assert cm.recipe == r
    import torch

    out = cm.generate(torch.arange(100).reshape(1, -1) + 32, max_new_tokens=3)  # longer than snapkv's 32-query window
    assert out.shape == (1, 103)
    kept = [layer[0] for layer in cm.last_stats["kept_tokens_per_head"]]  # per layer, row 0: tokens each KV head holds
    assert max(kept[0]) < max(kept[1])  # layer 0 has the low end of every range, layer 1 the high end


def test_layer_scope_lowrank_kv_gives_one_keep_per_layer_in_one_pass(llama, tmp_path):
    """lowrank_kv applies once: at layer scope its keep becomes a list (layer_form "list"), one Optuna parameter per layer."""
    space = search_space("lowrank_kv(scaling=none)", 20, scope="layer", num_layers=2)
    assert [(p.name, p.layer, p.layer_form, p.low, p.high) for p in space] == [
        ("0.lowrank_kv.keep.L0", 0, "list", 0.1, 1.0), ("0.lowrank_kv.keep.L1", 1, "list", 0.1, 1.0)]
    r = recipe_for("lowrank_kv(scaling=none)", space, {"0.lowrank_kv.keep.L0": 1.0, "0.lowrank_kv.keep.L1": 0.25})
    assert r == Recipe.parse('lowrank_kv(keep=[1.0, 0.25], scaling="none")')
    toml = tmp_path / "point.toml"
    toml.write_text(r.to_toml())
    assert Recipe.parse(str(toml)) == r
    cm = gw_compile(llama, recipe=str(toml), tokenizer=TOK)  # the TOML a Pareto point writes compiles back
    per = cm.step_graph.notes["lowrank_kv"]["per_layer"]
    assert [(per[0]["r_k"], per[0]["r_v"]), (per[1]["r_k"], per[1]["r_v"])] == [(32, 32), (8, 8)]  # round(keep * 2 heads * 16)
    ev = Evaluator(llama, TOK, **SMALL)
    m = ev.evaluate(r, base=ev.base())
    assert m["kv_fraction"] == pytest.approx((32 + 8) / 64)
    mixed = search_space("lowrank_kv + snapkv", 20, scope={"lowrank_kv": "layer"}, num_layers=2)
    assert [p.name for p in mixed] == ["0.lowrank_kv.keep.L0", "0.lowrank_kv.keep.L1", "1.snapkv.budget"]
