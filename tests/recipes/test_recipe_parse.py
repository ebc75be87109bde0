"""The accepted recipe forms parse to equal ``Recipe`` values and print back canonically."""

from __future__ import annotations

import pytest

import graphwright as gw
from graphwright.passes.base import instantiate
from graphwright.recipes import FrozenDict, Recipe

DESIGN_EXAMPLE = "lowrank_kv(keep=0.5) + fastgen(recovery=0.95)"


def test_string_form_of_the_design_example():
    r = Recipe.parse(DESIGN_EXAMPLE)
    assert r.passes == (("lowrank_kv", (("keep", 0.5),)), ("fastgen", (("recovery", 0.95),)))
    assert r.names == ("lowrank_kv", "fastgen")
    assert str(r) == DESIGN_EXAMPLE
    assert gw.Recipe is Recipe


def test_all_forms_are_equal(tmp_path):
    text = 'steer(heads={0: [1, 2], 3: [4]}, alpha=1e-3, mode=fast, on=true) + noop'
    as_list = [{"pass": "steer", "heads": {0: [1, 2], 3: [4]}, "alpha": 0.001, "mode": "fast", "on": True},
               {"pass": "noop"}]
    toml = tmp_path / "r.toml"
    toml.write_text('[[pass]]\nname = "steer"\nheads = {0 = [1, 2], 3 = [4]}\nalpha = 1e-3\nmode = "fast"\non = true\n\n'
                    '[[pass]]\nname = "noop"\n')
    r = Recipe.parse(text)
    assert Recipe.parse(as_list) == r
    assert Recipe.parse(str(toml)) == r
    assert Recipe.parse(toml) == r  # pathlib.Path
    assert Recipe.parse(r) is r
    assert r.to_list() == as_list
    assert hash(Recipe.parse(as_list)) == hash(r)


def test_values():
    r = Recipe.parse("p(a=1, b=-2.5, c=1e-3, d=-1E+2, e=.5, f=true, g=False, h='x y', i=\"q\", j=bare_word, "
                     "k=[1, [2, 3], []], l={0: 'a', -1: 'b', key: 1, 'quoted key': {}}, m=0)")
    args = dict(r.passes[0][1])
    assert args["a"] == 1 and isinstance(args["a"], int)
    assert args["b"] == -2.5 and args["c"] == 1e-3 and args["d"] == -100.0 and args["e"] == 0.5
    assert args["f"] is True and args["g"] is False
    assert args["h"] == "x y" and args["i"] == "q" and args["j"] == "bare_word"
    assert args["k"] == (1, (2, 3), ())
    assert isinstance(args["l"], FrozenDict) and dict(args["l"]) == {0: "a", -1: "b", "key": 1, "quoted key": FrozenDict()}
    assert args["m"] == 0


def test_string_escapes_round_trip():
    r = Recipe.parse(r'''p(s="a\"b\\c\n\t\u00e9\U0001F600", t='it\'s')''')
    args = dict(r.passes[0][1])
    assert args["s"] == 'a"b\\c\n\té\U0001F600'
    assert args["t"] == "it's"
    assert Recipe.parse(str(r)) == r


@pytest.mark.parametrize("text", ["noop", "noop()", "  noop ( )  ", "\nnoop\t"])
def test_no_args_spellings(text):
    assert Recipe.parse(text) == Recipe((("noop", ()),))
    assert str(Recipe.parse(text)) == "noop"


def test_whitespace_insensitive_and_trailing_commas():
    a = Recipe.parse("x(a=[1,2],b={0:[1]})+y")
    b = Recipe.parse(" x ( b = { 0 : [ 1 , ] , } , a = [ 1 , 2 ] , )\n+\ty ")
    assert a == b


@pytest.mark.parametrize("empty", [None, "", "   ", "identity", "identity()", [], ()])
def test_empty_recipe(empty):
    r = Recipe.parse(empty)
    assert r == Recipe() and len(r) == 0 and not r
    assert str(r) == "identity"
    assert r.to_list() == []
    assert instantiate(r) == []


def test_identity_inside_a_chain_is_dropped():
    assert Recipe.parse("identity + noop + identity") == Recipe.parse("noop")


def test_order_is_kept_and_args_are_sorted():
    r = Recipe.parse("b(z=1, a=2) + a")
    assert r.names == ("b", "a")
    assert str(r) == "b(a=2, z=1) + a"
    assert Recipe.parse("a + b") != Recipe.parse("b + a")


def test_equality_is_typed():
    assert Recipe.parse("p(x=1)") != Recipe.parse("p(x=1.0)")
    assert Recipe.parse("p(x=true)") != Recipe.parse("p(x=1)")
    assert Recipe.parse("p(x=[1])") != Recipe.parse("p(x={0: 1})")
    assert Recipe.parse("p(x='1')") != Recipe.parse("p(x=1)")


def test_floats_print_with_repr():
    r = Recipe.parse("p(a=0.1, b=1e-300, c=1e16, d=-0.0, e=2.0)")
    assert str(r) == "p(a=0.1, b=1e-300, c=1e+16, d=-0.0, e=2.0)"
    assert Recipe.parse(str(r)) == r


def test_list_form_accepts_tuples_and_is_independent_of_key_order():
    a = Recipe.parse([{"pass": "p", "a": (1, 2), "b": 3}])
    b = Recipe.parse([{"b": 3, "a": [1, 2], "pass": "p"}])
    assert a == b and a.to_list() == [{"pass": "p", "a": [1, 2], "b": 3}]


def test_toml_round_trip(tmp_path):
    r = Recipe.parse('a(x={-1: [1.5, "s\\n"], 2: {}}, y=false) + b')
    path = tmp_path / "r.toml"
    path.write_text(r.to_toml())
    assert Recipe.parse(path) == r


def test_recipes_add_and_hash():
    r = Recipe.parse("a") + "b(x=1)"
    assert r == Recipe.parse("a + b(x=1)")
    assert len({Recipe.parse("a+b(x=1)"), r}) == 1


def test_instantiate_noop():
    from graphwright.passes.noop import Noop

    (p,) = instantiate(Recipe.parse("noop()"))
    assert isinstance(p, Noop) and p.exact and p.values == {}
