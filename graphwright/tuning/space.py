"""The search space of ``graphwright tune``, built from the pass registry as plain data.

Each pass declares the arguments worth searching with ``Arg(..., tune=Tunable(...))``
(``passes/base.py``). ``search_space(template, context)`` lists, for every pass of a recipe
template, the declared tunables the template does not fix, as ``Param`` rows: a name
``"<pass index>.<pass>.<arg>"``, the kind, the range in the argument's own units (fractions of
the context turned into token counts for ``per_context`` tunables) and the scope. Invariant
(tested): every range lies inside the argument's declared ``min``/``max``, so every point of the
space is a recipe ``compile()`` accepts. Only ``scope="model"`` is built today; a layer or head
scope is refused with a clear error (no pass declares one yet).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import RecipeError
from ..passes.base import PASS_REGISTRY, Tunable
from ..recipes import Recipe


@dataclass(frozen=True)
class Param:
    """One searched value: where it goes in the recipe and the range Optuna samples it from."""

    name: str  # "<pass index>.<pass>.<arg>": unique when a template holds the same pass twice
    pass_index: int
    pass_name: str
    arg: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    scope: str = "model"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["choices"] = list(self.choices) if self.choices is not None else None
        return d


def tunables(pass_name: str) -> dict:
    """``{arg name: Tunable}`` that the registered pass declares (RecipeError for an unknown pass)."""
    from .. import passes as _registers  # noqa: F401

    cls = PASS_REGISTRY.get(pass_name)
    if cls is None:
        raise RecipeError(f"unknown pass {pass_name!r}; valid passes: {', '.join(sorted(PASS_REGISTRY))}")
    return {a.name: a.tune for a in cls.args if a.tune is not None}


def _resolve(pass_name: str, arg, t: Tunable, context: int) -> tuple:
    low, high = t.low, t.high
    if t.per_context:
        low, high = max(1, int(round(low * context))), max(1, int(round(high * context)))
    elif t.kind == "int":
        low, high = int(low), int(high)
    if t.kind != "categorical":
        if arg.min is not None:
            low = max(low, type(low)(arg.min) if t.kind == "int" else arg.min)
        if arg.max is not None:
            high = min(high, arg.max)
        if not low < high:
            raise RecipeError(f"{pass_name}.{arg.name}: the tuning range is empty at context {context} (low {low}, high {high})")
    return low, high


def search_space(template, context: int) -> list:
    """The ``Param`` list for a recipe template (string, list, TOML path or ``Recipe``) at ``context`` tokens.

    Arguments the template sets are fixed, not searched. A template with nothing to search is an
    error naming the passes that declare tunables.
    """
    from .. import passes as _registers  # noqa: F401

    if not (isinstance(context, int) and context >= 2):
        raise ValueError(f"context must be an int >= 2 (tokens the tuned model sees); got {context!r}")
    recipe = Recipe.parse(template)
    out = []
    for i, (name, args) in enumerate(recipe.passes):
        fixed = {k for k, _ in args}
        declared = {a.name: a for a in PASS_REGISTRY[name].args} if name in PASS_REGISTRY else None
        for arg_name, t in tunables(name).items():
            if arg_name in fixed:
                continue
            if t.scope != "model":
                raise RecipeError(f"{name}.{arg_name}: tuning scope {t.scope!r} is not built yet; only 'model' is")
            low, high = _resolve(name, declared[arg_name], t, context)
            out.append(Param(f"{i}.{name}.{arg_name}", i, name, arg_name, t.kind, low, high, t.log, t.choices, t.scope))
    if not out:
        with_tunables = sorted(n for n in PASS_REGISTRY if tunables(n))
        raise RecipeError(f"recipe {str(recipe)!r} leaves nothing to tune; passes that declare tunable arguments: {', '.join(with_tunables)}")
    return out


def recipe_for(template, space: list, values: dict) -> Recipe:
    """The template with each ``Param`` set to ``values[param.name]``: the recipe a trial compiles."""
    recipe = Recipe.parse(template)
    items = recipe.to_list()
    for p in space:
        if p.name not in values:
            raise KeyError(f"no value for tuned parameter {p.name!r}")
        items[p.pass_index][p.arg] = values[p.name]
    return Recipe.from_list(items)


def distributions(space: list) -> dict:
    """Optuna distributions ``{param name: distribution}`` for ``Trial``/``Study.ask``."""
    import optuna

    out = {}
    for p in space:
        if p.kind == "int":
            out[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
        elif p.kind == "float":
            out[p.name] = optuna.distributions.FloatDistribution(float(p.low), float(p.high), log=p.log)
        else:
            out[p.name] = optuna.distributions.CategoricalDistribution(list(p.choices))
    return out
