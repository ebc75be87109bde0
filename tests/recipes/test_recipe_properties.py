"""Property tests: every valid recipe round-trips through every form; junk only ever gives RecipeError."""

from __future__ import annotations

import re

import pytest
import tomllib
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from graphwright import RecipeError
from graphwright.passes.base import PASS_REGISTRY, Arg, Pass, instantiate
from graphwright.recipes import Recipe
from graphwright.recipes.grammar import MAX_DEPTH, MAX_INT

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RESERVED = {"true", "false", "True", "False", "identity", "pass", "name"}

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(lambda s: s not in RESERVED)
leaves = st.one_of(
    st.booleans(),
    st.integers(-MAX_INT, MAX_INT),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
# String keys that look like canonical ints are left out: TOML cannot tell "3" from 3.
dict_keys = st.one_of(st.integers(-1000, 1000), st.text(max_size=6).filter(lambda s: not re.fullmatch(r"-?(0|[1-9][0-9]*)", s)))
values = st.recursive(
    leaves,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(dict_keys, children, max_size=4)),
    max_leaves=8,
)
entries = st.tuples(names, st.dictionaries(names, values, max_size=4))
recipes = st.lists(entries, max_size=4).map(lambda es: Recipe(tuple(es)))


def depth(v) -> int:
    if isinstance(v, (tuple, list)):
        return 1 + max((depth(x) for x in v), default=0)
    if isinstance(v, dict) or hasattr(v, "items"):
        return 1 + max((depth(x) for x in v.values()), default=0)
    return 0


def shallow(r: Recipe) -> bool:
    return all(depth(v) <= MAX_DEPTH for _, args in r.passes for _, v in args)


@SETTINGS
@given(recipes)
def test_string_form_round_trips(r):
    assume(shallow(r))
    text = str(r)
    assert Recipe.parse(text) == r
    assert str(Recipe.parse(text)) == text  # the canonical form is a fixed point
    assert hash(Recipe.parse(text)) == hash(r)


@SETTINGS
@given(recipes)
def test_list_and_toml_forms_equal_the_string_form(r):
    assume(shallow(r))
    from_string = Recipe.parse(str(r))
    assert Recipe.parse(r.to_list()) == from_string
    assert Recipe.from_toml_data(tomllib.loads(r.to_toml())) == from_string


@SETTINGS
@given(st.lists(st.sampled_from(["noop", "noop()", " noop ( ) ", "identity"]), max_size=5), st.sampled_from([" + ", "+", "\n+\t"]))
def test_noop_chains_instantiate(parts, sep):
    text = sep.join(parts)
    n = sum(p.strip() != "identity" for p in parts)
    passes = instantiate(Recipe.parse(text))
    assert [p.name for p in passes] == ["noop"] * n


@pytest.fixture(scope="module")
def ranged_pass():
    class Ranged(Pass):
        name = "prop_ranged"
        args = (Arg("frac", float, 0.5, min=0.0, max=1.0), Arg("n", int, 1, min=1), Arg("heads", dict, None))

    PASS_REGISTRY[Ranged.name] = Ranged
    yield Ranged
    PASS_REGISTRY.pop(Ranged.name, None)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frac=st.floats(0.0, 1.0), n=st.integers(1, 10**6),
       heads=st.dictionaries(st.integers(0, 63), st.lists(st.integers(0, 63), max_size=4), max_size=4))
def test_in_range_values_reach_the_pass_unchanged(ranged_pass, frac, n, heads):
    r = Recipe.parse([{"pass": "prop_ranged", "frac": frac, "n": n, "heads": heads}])
    (p,) = instantiate(Recipe.parse(str(r)))
    assert (p.frac, p.n, p.heads) == (frac, n, heads)


def parse_and_instantiate(x):
    try:
        instantiate(Recipe.parse(x))
    except RecipeError:
        pass  # the only error allowed


GRAMMAR_CHARS = "abnoqp_019.-+eE()[]{},=:'\"\\ \n\tüé\x00"


@SETTINGS
@given(st.one_of(st.text(max_size=60), st.text(alphabet=GRAMMAR_CHARS, max_size=60)))
def test_random_text_only_raises_recipe_error(text):
    assume(not text.strip().lower().endswith(".toml"))  # those are file paths
    parse_and_instantiate(text)


@SETTINGS
@given(recipes, st.data())
def test_mutated_recipes_only_raise_recipe_error(r, data):
    text = str(r)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()) and text:
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + data.draw(st.sampled_from(list(GRAMMAR_CHARS))) + text[i:]
    parse_and_instantiate(text)


anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.binary(max_size=3)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), c, max_size=3)),
    max_leaves=10,
)


@SETTINGS
@given(st.lists(st.one_of(anything, st.dictionaries(st.just("pass"), st.one_of(names, st.just("noop"))).flatmap(
    lambda d: st.dictionaries(st.text(max_size=5), anything, max_size=3).map(lambda extra: {**extra, **d}))), max_size=3))
def test_random_list_forms_only_raise_recipe_error(items):
    parse_and_instantiate(items)
