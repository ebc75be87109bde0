"""The search space of ``graphwright tune``, built from the pass registry as plain data.

Each pass declares the arguments worth searching with ``Arg(..., tune=Tunable(...))``
(``passes/base.py``). ``search_space(template, context, scope, num_layers)`` lists, for every pass
of a recipe template, the declared tunables the template does not fix, as ``Param`` rows: a name
``"<pass index>.<pass>.<arg>"`` (``...<arg>.L<layer>`` at layer scope), the kind, the range in the
argument's own units (fractions of the context turned into token counts for ``per_context``
tunables) and the scope.

Scopes: ``"model"`` (default) gives one value per argument. ``"layer"`` (a string for every pass
of the template, or ``{pass name: scope}``) gives one value per layer to the arguments declared
``Tunable(scope="layer")``; ``recipe_for`` then writes the pass once per layer with
``layers=[l]`` (the eviction passes' ``layers=`` argument: each layer owns its policy's state),
over the template's own ``layers=`` when it sets them, or (``layer_form="list"``: ``lowrank_kv.keep``,
``streaming.window``) sets the argument of the one pass to the list of per-layer values. ``"head"``
gives one yes/no choice per (layer, KV head) to the arguments declared ``Tunable(scope="head",
head_form="pairs")`` (``duo.retrieval``: ``0.duo.retrieval.L3.H1``; ``recipe_for`` writes the
``[layer, kv_head]`` pairs chosen, ``duo(retrieval=[[3, 1], ...])``) and needs ``num_kv_heads``; and to
the per-head budget rule of the eviction passes (``head_form="switch"``: ``snapkv.heads``, ``h2o.heads``,
uniform or adaptive, i.e. SnapKV's / H2O's equal per-head budgets or Ada-KV's layer budget spread over
its KV heads by score) one categorical per layer, ``0.snapkv.heads.L3``, while the pass's per-layer
budgets are searched per layer as at layer scope; ``recipe_for`` writes one pass per layer,
``snapkv(budget=b3, heads="adaptive", layers=[3])``. A switch is not searched at model or layer scope
(the argument keeps its default, so those spaces are unchanged). A pass with no argument
declared at the asked scope is refused with the reason. Arguments declared at a coarser scope keep
one value for the model.
An argument declared ``Tunable(requires=(arg, value))`` is searched only when the template fixes ``arg``
to ``value``: ``snapkv(heads="scores")`` searches the budget and the share exponent ``gamma`` (one value
for the model: the shares already spread the budget over (layer, KV head) pairs), plain ``snapkv`` only
the budget.
Invariant (tested): every range lies inside the argument's declared ``min``/``max``, so every
point of the space is a recipe ``compile()`` accepts, at every scope.
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
    layer: int | None = None  # the layer this value is for (scope "layer" or "head"), else None
    # scope "layer": one pass per layer ("split") or one list-valued argument ("list"); scope "head": "pairs"
    layer_form: str = "split"
    head: int | None = None  # the KV head this yes/no choice is for (scope "head"), else None

    @classmethod
    def from_dict(cls, d: dict) -> "Param":
        d = dict(d)
        d["choices"] = tuple(d["choices"]) if d.get("choices") is not None else None
        return cls(**d)

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


USER_SCOPES = ("model", "layer", "head")
NO_LAYER_ARG = {
    "duo": "its retrieval/streaming split is per KV head (tune it at scope 'head': one retrieval choice per "
           "(layer, KV head)), not per layer",
    "block_sparse": "it takes dense_layers= (kept dense), not per-layer top_k/block values",
    "think": "its keep is declared for the whole model",
    "steer": "its heads= is a head set ({layer: [heads]}, a file, 'all' or 'auto') with no head-count argument",
}


def _scopes(scope, recipe) -> dict:
    """``{pass name: scope}`` from a scope string (every pass) or mapping; clear errors for anything else."""
    names = [n for n, _ in recipe.passes]
    if isinstance(scope, str):
        scope = {n: scope for n in names}
    if not isinstance(scope, dict):
        raise ValueError(f"scope must be one of {list(USER_SCOPES)} or a {{pass name: scope}} mapping; got {scope!r}")
    for name, sc in scope.items():
        if name not in names:
            raise ValueError(f"scope names pass {name!r}, which the template does not hold (it holds {', '.join(names)})")
        if sc not in USER_SCOPES:
            raise ValueError(f"scope of {name!r} must be one of {list(USER_SCOPES)}; got {sc!r}")
    return {n: scope.get(n, "model") for n in names}


def _all_layers(num_layers) -> list:
    if not (isinstance(num_layers, int) and num_layers >= 1):
        raise ValueError(f"layer scope needs the model's layer count (num_layers, an int >= 1); got {num_layers!r}")
    return list(range(num_layers))


def _layers_of(name: str, args: dict, num_layers) -> list:
    if not (isinstance(num_layers, int) and num_layers >= 1):
        raise ValueError(f"layer scope needs the model's layer count (num_layers, an int >= 1); got {num_layers!r}")
    from ..passes.eviction_common import select_layers
    from ..recipes.recipe import thaw

    return select_layers(name, thaw(args["layers"]) if args.get("layers") is not None else None, num_layers)


def search_space(template, context: int, scope="model", num_layers: int | None = None, num_kv_heads: int | None = None) -> list:
    """The ``Param`` list for a recipe template (string, list, TOML path or ``Recipe``) at ``context`` tokens.

    Arguments the template sets are fixed, not searched. A template with nothing to search is an
    error naming the passes that declare tunables. ``scope``: "model", "layer", "head" or ``{pass: scope}``;
    layer scope needs ``num_layers`` and refuses a pass with no per-layer argument, saying why; head
    scope also needs ``num_kv_heads`` and refuses a pass with no per-head argument.
    """
    from .. import passes as _registers  # noqa: F401

    if not (isinstance(context, int) and context >= 2):
        raise ValueError(f"context must be an int >= 2 (tokens the tuned model sees); got {context!r}")
    recipe = Recipe.parse(template)
    scopes = _scopes(scope, recipe)
    out = []
    for i, (name, args) in enumerate(recipe.passes):
        fixed = dict(args)
        declared = {a.name: a for a in PASS_REGISTRY[name].args} if name in PASS_REGISTRY else None
        todo = {k: t for k, t in tunables(name).items() if k not in fixed}
        # a head "switch" (how a layer's budget is split over its KV heads) is searched at head scope only
        todo = {k: t for k, t in todo.items() if t.head_form != "switch" or scopes[name] == "head"}
        # an argument that only means something under another argument's value (snapkv.gamma: heads="scores")
        todo = {k: t for k, t in todo.items() if t.requires is None or fixed.get(t.requires[0]) == t.requires[1]}
        for arg_name, t in todo.items():
            if t.scope not in USER_SCOPES:
                raise RecipeError(f"{name}.{arg_name}: tuning scope {t.scope!r} is not built yet; only {list(USER_SCOPES)} are")
            if t.scope == "layer" and t.layer_form == "split" and "layers" not in declared:
                raise RecipeError(f"{name}.{arg_name} declares scope 'layer' but {name} has no layers= argument to run per layer")
        if scopes[name] == "layer" and todo and not any(t.scope == "layer" for t in todo.values()):
            why = NO_LAYER_ARG.get(name, "none of its tunable arguments is declared per layer (Tunable(scope='layer'))")
            raise RecipeError(f"{name} cannot be tuned per layer: {why}; tune it at scope 'model' "
                              f"(e.g. scope={{'{name}': 'model'}} or leave it out of the layer scope)")
        if scopes[name] == "head" and todo and not any(t.scope == "head" for t in todo.values()):
            raise RecipeError(f"{name} cannot be tuned per head: none of its tunable arguments is declared per KV head "
                              f"(duo's retrieval set and the per-head budget rule heads= of snapkv and h2o are, "
                              f"Tunable(scope='head')); tune it at scope 'layer' or 'model' "
                              f"(e.g. scope={{'{name}': 'layer'}})")
        layers = heads = None
        if scopes[name] in ("layer", "head"):
            layers = _layers_of(name, fixed, num_layers) if "layers" in declared else _all_layers(num_layers)
        if scopes[name] == "head" and any(t.head_form == "pairs" for t in todo.values()):
            if not (isinstance(num_kv_heads, int) and num_kv_heads >= 1):
                raise ValueError(f"head scope needs the model's KV head count (num_kv_heads, an int >= 1); got {num_kv_heads!r}")
            heads = list(range(num_kv_heads))
        for arg_name, t in todo.items():
            base = f"{i}.{name}.{arg_name}"
            if t.head_form == "switch":  # head scope: the layer's per-head budget rule, one choice per layer (or one)
                per_layer = layers is not None and "layers" in declared
                out += ([Param(f"{base}.L{layer}", i, name, arg_name, "categorical", choices=tuple(t.choices), scope="head",
                               layer=layer, layer_form="split") for layer in layers] if per_layer else
                        [Param(base, i, name, arg_name, "categorical", choices=tuple(t.choices), scope="head")])
                continue
            if heads is not None and t.scope == "head":  # one yes/no per (layer, KV head): the pairs chosen
                out += [Param(f"{base}.L{layer}.H{h}", i, name, arg_name, "categorical", choices=(False, True), scope="head",
                              layer=layer, layer_form=t.head_form, head=h) for layer in layers for h in heads]
                continue
            low, high = _resolve(name, declared[arg_name], t, context)
            if layers is not None and t.scope == "layer":
                out += [Param(f"{base}.L{layer}", i, name, arg_name, t.kind, low, high, t.log, t.choices, "layer", layer, t.layer_form)
                        for layer in layers]
            else:
                out.append(Param(base, i, name, arg_name, t.kind, low, high, t.log, t.choices, "model"))
    if not out:
        with_tunables = sorted(n for n in PASS_REGISTRY if tunables(n))
        raise RecipeError(f"recipe {str(recipe)!r} leaves nothing to tune; passes that declare tunable arguments: {', '.join(with_tunables)}")
    return out


def recipe_for(template, space: list, values: dict) -> Recipe:
    """The template with each ``Param`` set to ``values[param.name]``: the recipe a trial compiles.

    A pass with layer-scope parameters is written once per layer, in layer order, each copy with
    ``layers=[l]``, the template's fixed arguments, the pass's model-scope values and layer l's values.
    A ``layer_form="list"`` parameter instead sets its argument, in the one pass, to the list of its
    per-layer values in layer order. Head-scope ``"pairs"`` choices set their argument to the sorted
    ``[layer, kv_head]`` pairs whose value is True (an empty list when none is).
    """
    recipe = Recipe.parse(template)
    items = recipe.to_list()
    per_layer: dict = {}
    lists: dict = {}
    pairs: dict = {}
    for p in space:
        if p.name not in values:
            raise KeyError(f"no value for tuned parameter {p.name!r}")
        if p.head is not None:
            chosen = pairs.setdefault((p.pass_index, p.arg), [])
            if values[p.name] is True:
                chosen.append([p.layer, p.head])
            elif values[p.name] is not False:
                raise ValueError(f"tuned parameter {p.name!r} is a yes/no choice (True or False); got {values[p.name]!r}")
        elif p.layer is None:
            items[p.pass_index][p.arg] = values[p.name]
        elif p.layer_form == "list":
            lists.setdefault((p.pass_index, p.arg), {})[p.layer] = values[p.name]
        else:
            per_layer.setdefault(p.pass_index, {}).setdefault(p.layer, {})[p.arg] = values[p.name]
    for (i, arg), by_layer in lists.items():
        items[i][arg] = [by_layer[layer] for layer in sorted(by_layer)]
    for (i, arg), chosen in pairs.items():
        items[i][arg] = sorted(chosen)
    out = []
    for i, item in enumerate(items):
        if i not in per_layer:
            out.append(item)
            continue
        for layer in sorted(per_layer[i]):
            out.append({**item, **per_layer[i][layer], "layers": [layer]})
    return Recipe.from_list(out)


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
