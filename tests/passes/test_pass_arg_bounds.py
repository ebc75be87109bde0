"""Every numeric pass argument has an upper bound, checked at recipe time (issue 19, item 10).

Invariants: for every registered pass, every int/float argument declares ``max`` (or choices), and
the largest int a recipe can hold (2**63 - 1) is a ``RecipeError`` naming the pass, the argument and
its range, never an overflow inside torch. ``fuse_moe(impl='triton')`` on a CPU model is refused at
compile time naming the allowed implementations.
"""

from __future__ import annotations

import pytest

import graphwright as gw
import graphwright.passes  # noqa: F401  (registers every pass)
from graphwright import RecipeError
from graphwright.passes.base import MAX_KERNEL, MAX_TOKENS, PASS_REGISTRY, instantiate, validate_args
from graphwright.recipes import Recipe
from graphwright.recipes.grammar import MAX_INT

# alpha scales attention probabilities through log(alpha): any finite float gives a finite bias (|log| < 710)
UNBOUNDED_OK = {("steer", "alpha")}


def numeric_args():
    for name, cls in sorted(PASS_REGISTRY.items()):
        for a in cls.args:
            types = a.type if isinstance(a.type, tuple) else (a.type,)
            if (int in types or float in types) and a.choices is None:
                yield name, a


NUMERIC = list(numeric_args())
REQUIRED = {"window": {"size": 4}}  # required arguments, so the one under test is what fails


def test_the_registry_has_numeric_arguments():
    assert len(NUMERIC) >= 15  # the review below covers them all, not a handful


@pytest.mark.parametrize("pass_name,arg", NUMERIC, ids=[f"{n}.{a.name}" for n, a in NUMERIC])
def test_every_numeric_argument_is_bounded(pass_name, arg):
    if (pass_name, arg.name) in UNBOUNDED_OK:
        return
    assert arg.max is not None, f"{pass_name}.{arg.name} has no upper bound"
    types = arg.type if isinstance(arg.type, tuple) else (arg.type,)
    if int in types:
        with pytest.raises(RecipeError, match=rf"{pass_name}: argument '{arg.name}' = {MAX_INT} is out of range"):
            validate_args(pass_name, PASS_REGISTRY[pass_name].args, {**REQUIRED.get(pass_name, {}), arg.name: MAX_INT})


@pytest.mark.parametrize("recipe,bound", [("snapkv(kernel={})", MAX_KERNEL), ("gemfilter(kernel={})", MAX_KERNEL),
                                          ("snapkv(budget={})", MAX_TOKENS), ("window(size={})", MAX_TOKENS)])
def test_bound_itself_is_accepted_and_one_more_is_not(recipe, bound):
    (p,) = instantiate(Recipe.parse(recipe.format(bound)))
    assert bound in p.values.values()
    with pytest.raises(RecipeError, match=f"out of range .*{bound}"):
        instantiate(Recipe.parse(recipe.format(bound + 2)))


def test_fuse_moe_triton_on_cpu_is_refused_at_compile_time(tiny, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RecipeError, match=r"fuse_moe: impl='triton' .* on cpu.*impl='sorted'.*impl='auto'"):
        gw.compile(tiny("tiny-mixtral"), recipe="fuse_moe(impl='triton')")
