"""The tuning search space comes from the passes' ``Arg(tune=...)`` declarations, as plain data."""

from __future__ import annotations

import pytest

from graphwright.errors import RecipeError
from graphwright.passes.base import PASS_REGISTRY, Arg, Pass, Tunable, instantiate
from graphwright.recipes import Recipe
from graphwright.tuning.space import distributions, recipe_for, search_space, tunables

# what issue 21's first slice declares (pass: tunable arguments)
DECLARED = {"lowrank_kv": {"keep"}, "snapkv": {"budget"}, "h2o": {"heavy", "recent"}, "streaming": {"window"},
            "evict": {"budget"}, "duo": {"retrieval", "window"}, "think": {"keep"}, "block_sparse": {"block", "top_k"},
            "steer": {"alpha"}}
# head-scope switches (searched at scope "head" only, so absent from the model-scope spaces below)
SWITCHES = {"snapkv": {"heads"}, "h2o": {"heads"}}
# searched only when the template sets another argument (Tunable(requires=...)): snapkv.gamma needs heads="scores"
CONDITIONAL = {"snapkv": {"gamma": ("heads", "scores")}}


def test_the_passes_declare_their_tunables():
    got = {name: set(tunables(name)) for name in PASS_REGISTRY if tunables(name)}
    assert got == {name: args | SWITCHES.get(name, set()) | set(CONDITIONAL.get(name, {})) for name, args in DECLARED.items()}
    assert {name: {a: t.requires for a, t in tunables(name).items() if t.requires} for name in CONDITIONAL} == CONDITIONAL
    assert {name: {a for a, t in tunables(name).items() if t.head_form == "switch"} for name in SWITCHES} == SWITCHES


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_every_point_of_the_space_is_a_valid_recipe(name):
    """Ranges lie inside each argument's declared min/max: the ends of every range instantiate."""
    template = {"evict": "evict(score=snapkv)", "steer": "steer(heads=all)"}.get(name, name)
    context = 300
    space = search_space(template, context)
    assert {p.arg for p in space} == DECLARED[name]
    declared = {a.name: a for a in PASS_REGISTRY[name].args}
    for p in space:
        a = declared[p.arg]
        assert p.scope == "model" and p.pass_name == name and p.name == f"0.{name}.{p.arg}"
        if p.kind == "categorical":
            ends = list(p.choices)
        else:
            assert (a.min is None or p.low >= a.min) and (a.max is None or p.high <= a.max) and p.low < p.high
            ends = [p.low, p.high]
        for v in ends:
            values = {q.name: (q.choices[0] if q.kind == "categorical" else q.low) for q in space} | {p.name: v}
            r = recipe_for(template, space, values)
            (made,) = instantiate(r)
            assert made.values[p.arg] == v


def test_context_fractions_become_token_counts_and_fixed_arguments_are_not_searched():
    (p,) = search_space("snapkv", 200)
    assert (p.kind, p.low, p.high) == ("int", 10, 200)  # Tunable("int", 0.05, 1.0, per_context=True)
    space = search_space("h2o(heavy=0.25) + streaming(sinks=2)", 100)
    assert [(p.name, p.low, p.high) for p in space] == [("0.h2o.recent", 0.02, 0.5), ("1.streaming.window", 5, 100)]
    r = recipe_for("h2o(heavy=0.25) + streaming(sinks=2)", space, {"0.h2o.recent": 0.1, "1.streaming.window": 40})
    assert r == Recipe.parse("h2o(heavy=0.25, recent=0.1) + streaming(sinks=2, window=40)")
    (s,) = search_space("steer", 100)
    assert s.log and (s.low, s.high) == (1e-3, 1.0)
    d = distributions(space)
    assert (d["1.streaming.window"].low, d["1.streaming.window"].high) == (5, 100)
    assert (d["0.h2o.recent"].low, d["0.h2o.recent"].high, d["0.h2o.recent"].log) == (0.02, 0.5, False)


def test_bad_templates_and_declarations_are_clear_errors(monkeypatch):
    with pytest.raises(RecipeError, match="leaves nothing to tune; passes that declare tunable arguments: .*snapkv"):
        search_space("noop", 100)
    with pytest.raises(RecipeError, match="leaves nothing to tune"):
        search_space("snapkv(budget=8)", 100)
    with pytest.raises(RecipeError, match="unknown pass"):
        search_space("snapk", 100)
    with pytest.raises(ValueError, match="context must be an int >= 2"):
        search_space("snapkv", 1)
    with pytest.raises(KeyError, match="no value for tuned parameter '0.snapkv.budget'"):
        recipe_for("snapkv", search_space("snapkv", 100), {})
    for kw, msg in [({"kind": "bool"}, "kind must be one of"), ({"kind": "int", "low": 3, "high": 3}, "low < high"),
                    ({"kind": "categorical"}, "needs choices"), ({"kind": "float", "low": 0, "high": 1, "log": True}, "low > 0"),
                    ({"kind": "int", "low": 1, "high": 2, "scope": "row"}, "scope must be one of"),
                    ({"kind": "int", "low": 1, "high": 2, "layer_form": "dict"}, "layer_form must be one of")]:
        with pytest.raises(ValueError, match=msg):
            Tunable(**kw)

    class PerLayer(Pass):
        name = "tune_test_per_layer"
        args = (Arg("keep", float, 0.5, "", min=0.0, max=1.0, tune=Tunable("float", 0.1, 1.0, scope="layer")),)

    monkeypatch.setitem(PASS_REGISTRY, PerLayer.name, PerLayer)
    with pytest.raises(RecipeError, match="declares scope 'layer' but tune_test_per_layer has no layers= argument"):
        search_space(PerLayer.name, 100)

    with pytest.raises(ValueError, match="a head-scope Tunable needs head_form in \\['pairs', 'switch'\\]"):
        Tunable("float", 0.1, 1.0, scope="head")
    with pytest.raises(ValueError, match="only a head-scope one takes it"):
        Tunable("float", 0.1, 1.0, scope="layer", head_form="pairs")
    with pytest.raises(ValueError, match="head_form in"):
        Tunable("float", 0.1, 1.0, scope="head", head_form="mask")
    with pytest.raises(ValueError, match="a head_form 'switch' Tunable is categorical"):
        Tunable("float", 0.1, 1.0, scope="head", head_form="switch")


def test_top_level_tune_is_the_study_function(tiny):
    """``graphwright.tune(...)`` (the issue's API) reaches ``tuning.study.tune``: a template with nothing to tune is refused."""
    import graphwright as gw

    assert callable(gw.tune) and "tune" in gw.__all__
    with pytest.raises(RecipeError, match="nothing to tune"):
        gw.tune(tiny("tiny-llama"), None, template="streaming(sinks=4, window=8)", trials=1, outputs=False)
