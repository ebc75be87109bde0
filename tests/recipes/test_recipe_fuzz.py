"""Fuzzing the recipe inputs the property suite does not reach: TOML files, deep nesting, pass arguments at their bounds.

Extends ``test_recipe_properties.py`` (round trips, random/mutated strings, random list forms).
Invariant: whatever the input, ``Recipe.parse`` + ``instantiate`` either succeed (and the result
prints to a string that parses back to the same recipe) or raise ``RecipeError`` with a message;
nothing else escapes (no ``RecursionError``, ``OverflowError``, ``TypeError``...). A short profile
runs in the default tests; ``@pytest.mark.slow`` runs the long one (11,000 inputs over three tests;
figures in NOTES-wt-fuzz.md).
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphwright.passes  # noqa: F401  (registers every pass)
from graphwright import RecipeError
from graphwright.errors import GraphwrightError
from graphwright.passes.base import PASS_REGISTRY, instantiate
from graphwright.recipes import Recipe
from graphwright.recipes.grammar import MAX_INT

SHORT = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def long_profile(n: int):
    """The slow profile: ``n`` examples (``GRAPHWRIGHT_FUZZ_SCALE`` multiplies it); the three long tests total 11,000 recipes."""
    return settings(max_examples=int(n * float(os.environ.get("GRAPHWRIGHT_FUZZ_SCALE", 1))), deadline=None,
                    suppress_health_check=list(HealthCheck))

_DIR = tempfile.mkdtemp(prefix="gw-fuzz-")


def only_recipe_errors(x):
    """Parse and instantiate ``x``; the only error allowed is a RecipeError with a message."""
    try:
        r = Recipe.parse(x)
        instantiate(r)
    except RecipeError as e:
        assert isinstance(e, GraphwrightError) and str(e).strip(), repr(e)
        return None
    assert Recipe.parse(str(r)) == r  # anything accepted prints to a string that parses back
    return r


# -- pass arguments at their bounds -----------------------------------------------------------
def _bound_values(arg):
    types = arg.type if isinstance(arg.type, tuple) else (arg.type,)
    out = [st.sampled_from([-MAX_INT, -1, 0, 1, MAX_INT, -0.0, 1e-300, 1e300, -1e300, True, False, "", "x" * 300, [], {}])]
    for b in (arg.min, arg.max):
        if b is not None:
            out.append(st.sampled_from([b, b - 1, b + 1, math.nextafter(b, math.inf), math.nextafter(b, -math.inf)]))
            if int in types:
                out.append(st.sampled_from([int(b), int(b) - 1, int(b) + 1]))
    if arg.choices:
        out.append(st.sampled_from(list(arg.choices)))
        out.append(st.sampled_from([str(c).upper() for c in arg.choices] + [" " + str(c) for c in arg.choices]))
    if list in types or dict in types or any(getattr(t, "__name__", "") == "Mapping" for t in types):
        small = st.integers(-2, 64)
        out.append(st.one_of(st.lists(small, max_size=4), st.dictionaries(small, st.lists(small, max_size=3), max_size=3),
                             st.dictionaries(st.text(max_size=3), st.one_of(small, st.text(max_size=3)), max_size=3),
                             st.lists(st.lists(small, max_size=2), max_size=2)))
    if str in types:
        out.append(st.sampled_from(["all", "auto", "/", ".", "/dev/zero", "nope.json", "a\x00b"]))
    return st.one_of(out)


PASSES = sorted(PASS_REGISTRY)


@st.composite
def pass_at_bounds(draw):
    name = draw(st.sampled_from(PASSES))
    cls = PASS_REGISTRY[name]
    args = draw(st.lists(st.sampled_from(cls.args), unique_by=lambda a: a.name, max_size=len(cls.args))) if cls.args else []
    entry = {"pass": name}
    for a in args:
        entry[a.name] = draw(_bound_values(a))
    if draw(st.integers(0, 9)) == 0:
        entry[draw(st.sampled_from(["kep", "budjet", "Heads", "x"]))] = 1  # a misspelt argument now and then
    return entry


@SHORT
@given(st.lists(pass_at_bounds(), min_size=1, max_size=3))
def test_pass_arguments_at_their_bounds(entries):
    only_recipe_errors(entries)


@pytest.mark.slow
@long_profile(4000)
@given(st.lists(pass_at_bounds(), min_size=1, max_size=3))
def test_pass_arguments_at_their_bounds_long(entries):
    only_recipe_errors(entries)


# -- TOML files -------------------------------------------------------------------------------
toml_chars = st.sampled_from(list('[]{}=,."\'\\#\n \tabcdnpsmekyu0123456789-+_:') + ["\x00", "é", "\r", '"""', "'''"])
toml_base = st.lists(pass_at_bounds(), max_size=3).map(
    lambda es: "".join(["[[pass]]\nname = " + repr(e["pass"]).replace("'", '"') + "\n" +
                        "".join(f"{k} = {v!r}\n" for k, v in e.items() if k != "pass" and isinstance(v, (int, str)))
                        for e in es]))


@st.composite
def toml_texts(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:  # a mutated near-valid file
        text = draw(toml_base)
        for _ in range(draw(st.integers(0, 4))):
            i = draw(st.integers(0, len(text)))
            text = text[:i] + draw(toml_chars) + text[i + draw(st.integers(0, 1)):]
        return text
    if kind == 1:  # deep nesting of arrays or inline tables
        n = draw(st.integers(1, 3000))
        o, c = draw(st.sampled_from([("[", "]"), ("{a = ", "}"), ("[{b = ", "}]")]))
        return '[[pass]]\nname = "noop"\nx = ' + o * n + "1" * (o != "[") + c * n + "\n"
    if kind == 2:  # random text over TOML's alphabet
        return "".join(draw(st.lists(toml_chars, max_size=80)))
    return draw(st.sampled_from(['pass = 3', 'pass = [1, 2]', '[[pass]]', '[[pass]]\nname = 3', '[[pass]]\nname = "noop"\nname2 = 1e999',
                                 '[pass]\nname = "noop"', 'other = 1', '[[pass]]\nname = "noop"\nx = 99999999999999999999',
                                 '[[pass]]\nname = "noop"\nx = {99999999999999999999999 = 1}', '[[pass]]\nname = "noop"\nx = nan',
                                 '[[pass]]\nname = "noop"\nx = 1979-05-27T07:32:00Z', '[[pass]]\nname = "noop"\nx = [[1], {}]']))


def _toml_file(text: str) -> str:
    path = os.path.join(_DIR, "fuzz.toml")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    return path


@SHORT
@given(toml_texts())
def test_toml_files_only_raise_recipe_error(text):
    only_recipe_errors(_toml_file(text))


@pytest.mark.slow
@long_profile(3000)
@given(toml_texts())
def test_toml_files_long(text):
    only_recipe_errors(_toml_file(text))


# -- every form at once, long -----------------------------------------------------------------
recipe_strings = st.one_of(
    st.text(alphabet="abnoqp_019.-+eE()[]{},=:'\"\\ \n\tüé\x00", max_size=80),
    st.integers(1, 2000).map(lambda n: "noop(x=" + "[" * n + "]" * n + ")"),
    st.lists(pass_at_bounds(), min_size=1, max_size=3).map(lambda es: str(Recipe(())) if not es else _as_string(es)),
)


def _as_string(entries) -> str:
    try:
        return str(Recipe.parse(entries))
    except RecipeError:
        return "noop"


@pytest.mark.slow
@long_profile(4000)
@given(recipe_strings)
def test_recipe_strings_long(text):
    if text.strip().lower().endswith(".toml"):
        return
    only_recipe_errors(text)
