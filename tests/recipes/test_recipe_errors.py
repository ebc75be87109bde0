"""Bad recipes are ``RecipeError``s whose message says what is wrong (and where)."""

from __future__ import annotations

import pytest

from graphwright import RecipeError
from graphwright.passes.base import PASS_REGISTRY, Arg, Pass, instantiate
from graphwright.recipes import Recipe


def fails(x, *fragments):
    """Parse and instantiate ``x``; assert a RecipeError whose message holds every fragment."""
    with pytest.raises(RecipeError) as info:
        instantiate(Recipe.parse(x))
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("text, fragments", [
    ("noop(", ["offset 5", "expected an argument name or ')'", "end of input"]),
    ("noop)", ["offset 4", "expected '+' between passes"]),
    ("a(x=1))", ["offset 6", "expected '+'"]),
    ("a(x=[1, 2)", ["offset 9", "']' closing a list"]),
    ("a(x={0: 1)", ["offset 9", "'}' closing a dict"]),
    ("a(x={0 1})", ["offset 7", "':' after a dict key"]),
    ("a(x={1.5: 1})", ["offset 5", "a dict key"]),
    ("a(x={0: 1, 0: 2})", ["offset 11", "duplicate dict key 0"]),
    ("a(1)", ["offset 2", "an argument name"]),
    ("a(x 1)", ["offset 4", "'=' after argument name 'x'", "keyword only"]),
    ("a(x=)", ["offset 4", "expected a value"]),
    ("a(x=1, x=2)", ["offset 7", "duplicate argument 'x' in pass 'a'"]),
    ("a +", ["offset 3", "expected a pass name"]),
    ("+ a", ["offset 0", "expected a pass name"]),
    ("a b", ["offset 2", "'+' between passes"]),
    ("true", ["offset 0", "expected a pass name"]),
    ("a(x=1e999)", ["offset 4", "1e999 is too large"]),
    ("a(x=-1e999)", ["offset 4", "too large"]),
    ("a(x=123456789012345678901234567890)", ["offset 4", "out of range"]),
    ("a(x=" + "9" * 6000 + ")", ["offset 4", "out of range"]),
    ("a(x=1abc)", ["offset 4", "malformed number"]),
    ("a(x=1.2.3)", ["offset 4", "malformed number"]),
    ("a(x=-)", ["offset 4", "malformed number"]),
    ("a(x='abc)", ["offset 4", "unterminated string"]),
    ("a(x='\\q')", ["offset 5", "unknown escape"]),
    ("a(x='\\u12')", ["offset 5", "needs 4 hex digits"]),
    ("a(x='\\U00110000')", ["offset 5", "beyond the last unicode code point"]),
    ("a(x=é)", ["offset 4", "unexpected character", "U+00E9"]),
    ("ünïcode", ["offset 0", "unexpected character"]),
    ("a\x00", ["offset 1", "U+0000"]),
    ("noop; import os", ["offset 4", "unexpected character ';'"]),
    ("__import__('os')", ["offset 11", "an argument name"]),
    ("a(x=" + "[" * 17 + "]" * 17 + ")", ["nested deeper than 16"]),
    ("a(x=" + "{0:" * 20 + "1" + "}" * 20 + ")", ["nested deeper than 16"]),
])
def test_syntax_errors(text, fragments):
    fails(text, "recipe string", *fragments)


def test_sixteen_levels_are_fine():
    r = Recipe.parse("a(x=" + "[" * 16 + "]" * 16 + ")")
    assert Recipe.parse(str(r)) == r


def test_huge_string():
    from graphwright.recipes.grammar import MAX_LENGTH

    fails("noop + " * (MAX_LENGTH // 7 + 1), "characters long", f"at most {MAX_LENGTH}")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "-Infinity", "[1, inf]"])
def test_nan_and_inf_are_refused(text):
    fails(f"dummy(frac={text})", "recipe string", "is not allowed; numbers must be finite")


def test_quoted_nan_is_a_string(dummy_pass):
    assert dict(Recipe.parse("p(x='nan')").passes[0][1])["x"] == "nan"
    fails("dummy(frac='nan')", "'frac' must be float")


@pytest.mark.parametrize("value, fragment", [
    (float("nan"), "must be finite"), (float("inf"), "must be finite"), (None, "leave the argument out"),
    (object(), "unsupported value"), ({1.5: 2}, "dict key 1.5 must be an int or a string"), (2**70, "out of range"),
])
def test_bad_values_in_the_list_form(value, fragment):
    fails([{"pass": "noop", "x": value}], "argument 'x'", fragment)


def test_bad_list_forms():
    fails([{"name": "noop"}], "missing the 'pass' key")
    fails(["noop"], "expected a dict")
    fails([{"pass": "bad name"}], "'bad name' is not a valid name")
    fails([{"pass": 3}], "pass name 3 is not a valid name")
    fails([{"pass": "a", "x y": 1}], "argument name 'x y' is not a valid name")
    fails([{"pass": "identity", "x": 1}], "takes no arguments")
    deep = 1
    for _ in range(20):
        deep = [deep]
    fails([{"pass": "a", "x": deep}], "nested deeper than 16")
    fails({"pass": "noop"}, "got dict")
    fails(42, "got int")


def test_unknown_pass_lists_valid_names_sorted(dummy_pass):
    msg = fails("noop + nope", "unknown pass 'nope'", "valid passes: ")
    assert msg.endswith(", ".join(sorted(PASS_REGISTRY)))
    fails("nop", "did you mean 'noop'?")


def test_planned_pass_is_not_implemented_yet(monkeypatch):
    import graphwright.recipes.recipe as recipe_mod

    # a name on the roadmap but not registered gets "not implemented yet", not "unknown"
    monkeypatch.setattr(recipe_mod, "PLANNED_PASSES", (*recipe_mod.PLANNED_PASSES, "future_pass"))
    assert "future_pass" not in PASS_REGISTRY
    msg = fails("future_pass()", "pass 'future_pass' is not implemented yet", "implemented passes:")
    assert "unknown" not in msg


@pytest.fixture
def dummy_pass():
    """A test-only pass with typed, ranged arguments; unregistered afterwards."""

    class Dummy(Pass):
        name = "dummy"
        args = (Arg("frac", float, 0.5, min=0.0, max=1.0), Arg("n", int, 3, min=1),
                Arg("mode", str, "a", choices=("a", "b")), Arg("heads", dict, None))

    PASS_REGISTRY["dummy"] = Dummy
    yield Dummy
    PASS_REGISTRY.pop("dummy", None)


def test_argument_validation(dummy_pass):
    fails("dummy(fracc=0.5)", "dummy: unknown argument 'fracc'", "valid arguments: frac, n, mode, heads")
    fails("noop(x=1)", "noop: unknown argument 'x'", "valid arguments: (none)")
    fails("dummy(frac='half')", "'frac' must be float", "'half'")
    fails("dummy(n=2.5)", "'n' must be int")
    fails("dummy(n=true)", "'n' must be int")
    fails("dummy(frac=1.5)", "'frac' = 1.5 is out of range [0.0, 1.0]")
    fails("dummy(n=0)", "'n' = 0 is out of range [1, inf]")
    fails("dummy(mode=c)", "'mode' must be one of ['a', 'b']")
    fails("dummy(heads=[1])", "'heads' must be dict")
    fails([{"pass": "dummy", "self": 1}], "unknown argument 'self'")
    (p,) = instantiate(Recipe.parse("dummy(frac=1, heads={0: [1, 2]})"))
    assert p.frac == 1.0 and p.heads == {0: [1, 2]} and p.n == 3


def test_missing_toml_file(tmp_path):
    fails(str(tmp_path / "nope.toml"), "recipe file not found", "nope.toml")


@pytest.mark.parametrize("content, fragments", [
    ("[[pass]\nname = 'noop'\n", ["is not valid TOML"]),
    ("[[pass]]\nname = \n", ["is not valid TOML"]),
    ("title = 'x'\n", ["unexpected top-level key 'title'"]),
    ("pass = 3\n", ["array of tables"]),
    ("[[pass]]\nkeep = 0.5\n", ["needs name ="]),
    ("[[pass]]\nname = 'noop'\nx = nan\n", ["must be finite"]),
    ("[[pass]]\nname = 'noop'\nwhen = 1979-05-27\n", ["unsupported value"]),
    ("[[pass]]\nname = 'no op'\n", ["'no op' is not a valid name"]),
])
def test_corrupt_toml(tmp_path, content, fragments):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    fails(path, *fragments)


def test_toml_that_is_not_utf8(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    fails(path, "not UTF-8")
