"""Recipe inputs at and past their limits: deep TOML, huge numbers, long string forms (issue 19, item 8).

Invariants: every limit is a ``RecipeError`` naming it (never ``RecursionError``/``OverflowError``), and
the string-length limit holds for every form, so any ``Recipe`` prints to a string that parses back.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from graphwright import RecipeError
from graphwright.recipes import Recipe
from graphwright.recipes.grammar import MAX_DEPTH, MAX_LENGTH


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 500, 5000])
def test_deeply_nested_toml_is_a_recipe_error(tmp_path, depth):
    p = tmp_path / "deep.toml"
    p.write_text('[[pass]]\nname = "noop"\nx = ' + "[" * depth + "]" * depth + "\n")
    with pytest.raises(RecipeError, match="nested"):
        Recipe.parse(p)


def test_deeply_nested_inline_tables_are_a_recipe_error(tmp_path):
    p = tmp_path / "deep.toml"
    p.write_text('[[pass]]\nname = "noop"\nx = ' + "{a = " * 400 + "1" + "}" * 400 + "\n")
    with pytest.raises(RecipeError, match="nested"):
        Recipe.parse(p)


def test_toml_data_nested_past_the_limit_is_refused():
    v: list = []
    for _ in range(MAX_DEPTH + 2):
        v = [v]
    with pytest.raises(RecipeError, match=f"deeper than {MAX_DEPTH}"):
        Recipe.from_toml_data({"pass": [{"name": "noop", "x": v}]})


def test_huge_toml_int_key_is_refused():
    with pytest.raises(RecipeError, match="out of range"):
        Recipe.from_toml_data({"pass": [{"name": "noop", "x": {"9" * 30: 1}}]})


@pytest.mark.parametrize("value", [Fraction(10**400, 1), Fraction(-(10**400), 3)])
def test_huge_fraction_is_a_recipe_error(value):
    with pytest.raises(RecipeError, match="out of the float range"):
        Recipe.parse([{"pass": "noop", "x": value}])


def test_fraction_in_range_becomes_a_float():
    assert Recipe.parse([{"pass": "noop", "x": Fraction(1, 4)}]) == Recipe.parse("noop(x=0.25)")


def test_decimal_is_refused_with_the_allowed_types():
    with pytest.raises(RecipeError, match="use numbers, true/false, strings, lists or dicts"):
        Recipe.parse([{"pass": "noop", "x": Decimal("1e999")}])


def test_string_form_over_ten_thousand_characters_parses_back():
    r = Recipe.parse([{"pass": "noop", "x": "a" * 20_000, "y": list(range(3000))}])
    text = str(r)
    assert 10_000 < len(text) <= MAX_LENGTH
    assert Recipe.parse(text) == r


def test_length_limit_holds_for_every_form():
    """A list-form recipe whose string form would be over the limit is refused, not left unprintable-back."""
    with pytest.raises(RecipeError, match=f"at most {MAX_LENGTH}"):
        Recipe.parse([{"pass": "noop", "x": "a" * MAX_LENGTH}])
    # escapes count: 20,000 control characters print as \\u0001 (6 characters each)
    with pytest.raises(RecipeError, match="string form"):
        Recipe.parse([{"pass": "noop", "x": "\x01" * 20_000}])
    r = Recipe.parse([{"pass": "noop", "x": "\x01" * 10_000}])
    assert Recipe.parse(str(r)) == r
