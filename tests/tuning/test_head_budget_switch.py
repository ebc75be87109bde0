"""graphwright.tune at head scope for the eviction budgets: each layer's budget and its per-head split (uniform or Ada-KV)."""

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
DENSE = 39  # tokens a dense layer holds after the last decode step of a 40-token window
STEPS = 19  # decode steps after the 20-token prefix: each appends one token per head to what prefill kept


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


def test_snapkv_and_h2o_at_head_scope_search_each_layers_budget_and_its_head_split():
    space = search_space("snapkv", 20, scope="head", num_layers=2)  # no KV head count needed: a switch is per layer
    assert [(p.name, p.kind, p.scope, p.layer) for p in space] == [
        ("0.snapkv.budget.L0", "int", "layer", 0), ("0.snapkv.budget.L1", "int", "layer", 1),
        ("0.snapkv.heads.L0", "categorical", "head", 0), ("0.snapkv.heads.L1", "categorical", "head", 1)]
    assert space[2].choices == ("uniform", "adaptive") and (space[0].low, space[0].high) == (1, 20)
    values = {"0.snapkv.budget.L0": 6, "0.snapkv.budget.L1": 11, "0.snapkv.heads.L0": "adaptive", "0.snapkv.heads.L1": "uniform"}
    assert recipe_for("snapkv", space, values) == Recipe.parse(
        'snapkv(budget=6, heads="adaptive", layers=[0]) + snapkv(budget=11, heads="uniform", layers=[1])')
    assert list(distributions(space)["0.snapkv.heads.L1"].choices) == ["uniform", "adaptive"]
    assert Param.from_dict(space[3].to_dict()) == space[3]  # stored in the study and read back by every worker
    # h2o: both budgets per layer and the switch; a template that fixes heads= searches no switch
    assert [p.name for p in search_space("h2o(heavy=0.1)", 20, scope="head", num_layers=2)] == [
        "0.h2o.recent.L0", "0.h2o.recent.L1", "0.h2o.heads.L0", "0.h2o.heads.L1"]
    with pytest.raises(RecipeError, match="snapkv cannot be tuned per head"):  # the template fixed the split: use layer scope
        search_space('snapkv(heads="adaptive")', 20, scope="head", num_layers=2)
    with pytest.raises(RecipeError, match="streaming cannot be tuned per head"):
        search_space("streaming", 20, scope="head", num_layers=2)
    # model and layer scope are unchanged: the switch keeps its default there
    assert [p.name for p in search_space("snapkv", 20)] == ["0.snapkv.budget"]
    assert [p.name for p in search_space("h2o", 20, scope="layer", num_layers=2)] == [
        "0.h2o.heavy.L0", "0.h2o.heavy.L1", "0.h2o.recent.L0", "0.h2o.recent.L1"]
    # beside duo: duo's fraction at model scope, snapkv's budgets and split per layer on the retrieval part
    mixed = search_space("duo(sinks=4) + snapkv", 20, scope={"duo": "model", "snapkv": "head"}, num_layers=2)
    assert [p.name for p in mixed] == ["0.duo.retrieval", "0.duo.window", "1.snapkv.budget.L0", "1.snapkv.budget.L1",
                                       "1.snapkv.heads.L0", "1.snapkv.heads.L1"]


def test_head_split_study_holds_the_layers_budgets_and_the_exact_setting_is_dense(llama, tmp_path):
    exact = {"0.snapkv.budget.L0": 20, "0.snapkv.budget.L1": 20, "0.snapkv.heads.L0": "adaptive", "0.snapkv.heads.L1": "adaptive"}
    mixed = {"0.snapkv.budget.L0": 6, "0.snapkv.budget.L1": 11, "0.snapkv.heads.L0": "adaptive", "0.snapkv.heads.L1": "uniform"}
    r = tune(llama, TOK, template="snapkv", budget=1.0, trials=3, population=3, out=tmp_path, eval_settings=SMALL,
             scope="head", enqueue=[exact, mixed])
    done = [t for t in r["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 3
    for t in done:  # every head of layer l keeps budget_l prompt tokens plus the decoded ones, whichever the split
        b = [t["params"][f"0.snapkv.budget.L{layer}"] for layer in (0, 1)]
        h = [t["params"][f"0.snapkv.heads.L{layer}"] for layer in (0, 1)]
        assert Recipe.parse(t["recipe"]) == Recipe.parse(
            f'snapkv(budget={b[0]}, heads="{h[0]}", layers=[0]) + snapkv(budget={b[1]}, heads="{h[1]}", layers=[1])')
        assert t["kv_fraction"] == pytest.approx(sum(x + STEPS for x in b) / (2 * DENSE))
    assert done[0]["params"] == exact  # Ada-KV with every prompt token in budget is the dense model
    # the packed Ada-KV attention sums in another order than dense attention: equal to float rounding (1e-7 seen)
    assert done[0]["kv_fraction"] == 1.0 and done[0]["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert done[1]["params"] == mixed and done[1]["kv_fraction"] == pytest.approx((6 + 11 + 2 * STEPS) / (2 * DENSE))
    assert done[1]["ppl_ratio"] != pytest.approx(1.0, abs=1e-6)  # it did evict
    for p in r["pareto"]:
        cm = gw_compile(llama, recipe=p["toml"], tokenizer=TOK)  # each Pareto point's TOML is what compile() takes
        assert cm.recipe == Recipe.parse(p["recipe"])
    ev = Evaluator(llama, TOK, **SMALL)  # the adaptive split of a layer changes what is kept, not how much
    base = ev.base()
    ada = ev.evaluate('snapkv(budget=6, heads="adaptive", layers=[0]) + snapkv(budget=11, heads="adaptive", layers=[1])', base=base)
    uni = ev.evaluate("snapkv(budget=6, layers=[0]) + snapkv(budget=11, layers=[1])", base=base)
    assert ada["kv_bytes"] == uni["kv_bytes"] and ada["nll"] != uni["nll"]
