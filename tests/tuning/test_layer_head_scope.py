"""graphwright.tune on tiny-llama: per-layer streaming windows (one list-valued pass) and duo's retrieval set per KV head."""

from __future__ import annotations

import pytest

from graphwright.compile import compile as gw_compile
from graphwright.errors import RecipeError
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.models import load_model
from graphwright.recipes import Recipe
from graphwright.tuning.objectives import Evaluator
from graphwright.tuning.space import Param, distributions, recipe_for, search_space
from graphwright.tuning.study import tune

SMALL = {"windows": 1, "window": 40, "prefix": 20}
TOK = ByteTokenizer()
DENSE = 39  # tokens a dense layer (and a retrieval head) holds after the last decode step of a 40-token window


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


def test_streaming_at_layer_scope_is_one_window_per_layer_in_one_pass():
    space = search_space("streaming(sinks=4)", 20, scope="layer", num_layers=4)
    assert [(p.name, p.layer, p.layer_form, p.low, p.high) for p in space] == [
        (f"0.streaming.window.L{i}", i, "list", 1, 20) for i in range(4)]  # 0.05 and 1.0 of the 20-token context
    r = recipe_for("streaming(sinks=4)", space, {f"0.streaming.window.L{i}": w for i, w in enumerate([5, 12, 7, 3])})
    assert r == Recipe.parse("streaming(sinks=4, window=[5, 12, 7, 3])")
    some = search_space("streaming(sinks=4, layers=[1, 3])", 20, scope="layer", num_layers=4)  # the template's layers only
    assert [p.name for p in some] == ["0.streaming.window.L1", "0.streaming.window.L3"]
    r = recipe_for("streaming(sinks=4, layers=[1, 3])", some, {"0.streaming.window.L1": 9, "0.streaming.window.L3": 2})
    assert r == Recipe.parse("streaming(sinks=4, layers=[1, 3], window=[9, 2])")
    (model_scope,) = search_space("streaming(sinks=4)", 20)  # model scope: still one window
    assert (model_scope.name, model_scope.scope) == ("0.streaming.window", "model")


def test_per_layer_streaming_study_measures_each_layer_and_its_tomls_compile(llama, tmp_path):
    r = tune(llama, TOK, template="streaming(sinks=4)", budget=0.9, trials=3, population=3, out=tmp_path, eval_settings=SMALL,
             scope="layer")
    done = [t for t in r["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 3
    for t in done:  # each layer holds sinks + its own window of the 39 dense tokens
        w0, w1 = t["params"]["0.streaming.window.L0"], t["params"]["0.streaming.window.L1"]
        assert Recipe.parse(t["recipe"]) == Recipe.parse(f"streaming(sinks=4, window=[{w0}, {w1}])")
        assert t["kv_fraction"] == pytest.approx((4 + w0 + 4 + w1) / (2 * DENSE))
    assert any(t["params"]["0.streaming.window.L0"] != t["params"]["0.streaming.window.L1"] for t in done)
    assert r["pareto"]
    for p in r["pareto"]:
        cm = gw_compile(llama, recipe=p["toml"], tokenizer=TOK)  # the TOML each Pareto point writes is what compile() takes
        assert cm.recipe == Recipe.parse(p["recipe"])
        w = cm.recipe.to_list()[0]["window"]
        assert [cm.step_graph.notes["streaming"]["per_layer"][i]["window"] for i in (0, 1)] == w


def test_duo_at_head_scope_is_one_choice_per_kv_head():
    space = search_space("duo(sinks=2)", 100, scope="head", num_layers=2, num_kv_heads=2)
    assert [(p.name, p.kind, p.choices, p.layer, p.head) for p in space[:4]] == [
        (f"0.duo.retrieval.L{layer}.H{h}", "categorical", (False, True), layer, h) for layer in (0, 1) for h in (0, 1)]
    assert [(p.name, p.scope) for p in space[4:]] == [("0.duo.window", "model")]  # window: one value for the model
    values = {"0.duo.retrieval.L0.H1": True, "0.duo.retrieval.L1.H0": True, "0.duo.retrieval.L0.H0": False,
              "0.duo.retrieval.L1.H1": False, "0.duo.window": 8}
    assert recipe_for("duo(sinks=2)", space, values) == Recipe.parse("duo(retrieval=[[0, 1], [1, 0]], sinks=2, window=8)")
    none = {**values, "0.duo.retrieval.L0.H1": False, "0.duo.retrieval.L1.H0": False}
    assert recipe_for("duo(sinks=2)", space, none) == Recipe.parse("duo(retrieval=[], sinks=2, window=8)")  # every head streams
    with pytest.raises(ValueError, match="is a yes/no choice"):
        recipe_for("duo(sinks=2)", space, {**values, "0.duo.retrieval.L0.H0": 1})
    assert list(distributions(space)["0.duo.retrieval.L0.H0"].choices) == [False, True]
    big = search_space("duo(sinks=2, window=8)", 100, scope="head", num_layers=30, num_kv_heads=3)  # smollm2-135m's shape
    assert len(big) == 90 and big[-1].name == "0.duo.retrieval.L29.H2"
    assert Param.from_dict(big[-1].to_dict()) == big[-1]  # stored in the study and read back by every worker
    mixed = search_space("duo(sinks=2, window=8) + snapkv", 100, scope={"duo": "head", "snapkv": "layer"}, num_layers=2, num_kv_heads=2)
    assert [p.name for p in mixed][4:] == ["1.snapkv.budget.L0", "1.snapkv.budget.L1"]
    with pytest.raises(ValueError, match="head scope needs the model's KV head count"):
        search_space("duo", 100, scope="head", num_layers=2)


def test_duo_head_scope_study_measures_the_chosen_heads_and_every_head_retrieval_is_exact(llama, tmp_path):
    all_retrieval = {f"0.duo.retrieval.L{layer}.H{h}": True for layer in (0, 1) for h in (0, 1)}
    r = tune(llama, TOK, template="duo(sinks=2, window=8)", budget=1.0, trials=3, population=3, out=tmp_path, eval_settings=SMALL,
             scope="head", enqueue=[all_retrieval])
    done = [t for t in r["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 3
    for t in done:  # a retrieval head holds all 39 tokens, a streaming head sinks + window = 10
        chosen = sorted([layer, h] for layer in (0, 1) for h in (0, 1) if t["params"][f"0.duo.retrieval.L{layer}.H{h}"])
        assert Recipe.parse(t["recipe"]) == Recipe.parse(f"duo(retrieval={chosen}, sinks=2, window=8)")
        assert t["kv_fraction"] == pytest.approx((len(chosen) * DENSE + (4 - len(chosen)) * 10) / (4 * DENSE))
    exact = done[0]  # the enqueued point: every head retrieval is the dense model
    assert exact["params"] == all_retrieval and exact["kv_fraction"] == 1.0 and exact["ppl_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert any(t["kv_fraction"] < 1 for t in done)
    for p in r["pareto"]:
        cm = gw_compile(llama, recipe=p["toml"], tokenizer=TOK)
        assert cm.recipe == Recipe.parse(p["recipe"])
    ev = Evaluator(llama, TOK, **SMALL)  # a head set measured outside the study: what a trial with it records
    m = ev.evaluate("duo(retrieval=[[1, 0]], sinks=2, window=8)", base=ev.base())
    assert m["kv_fraction"] == pytest.approx((DENSE + 3 * 10) / (4 * DENSE))


def test_head_scope_refusals(llama, tmp_path):
    with pytest.raises(RecipeError, match="streaming cannot be tuned per head"):
        tune(llama, TOK, template="streaming", scope="head", out=tmp_path / "a", outputs=False)
    with pytest.raises(RecipeError, match="duo cannot be tuned per layer"):
        tune(llama, TOK, template="duo", scope="layer", out=tmp_path / "b", outputs=False)
