"""What a rewrite pass is: a small object with a recipe name, declared arguments, and ``run``.

A pass rewrites the step graph (nodes, parameters and the ``StateSpec`` list) and never
touches the Hugging Face module. It records what it did in ``sg.notes[name]`` as plain data::

    sg.notes["lowrank_kv"] = {
        "per_layer": {0: {"r_k": 96, "r_v": 80}, 1: {...}},   # shown by cm.report()
        "counts": {"attention_rewritten": 30},                # asserted by tests
        "settings": {...},                                    # how it was calibrated
        "show": ["r_k", "r_v"],       # optional: per-layer keys in the terminal column (to_dict has all)
    }

and tags each attention node it changes with ``node.meta["graphwright"]["variant"]``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import RecipeError

_MISSING = object()

# Upper bounds shared by pass arguments, so no recipe value overflows inside torch:
MAX_TOKENS = 2**31 - 1  # token counts (budgets, windows, sinks, blocks): past any context length, fits int32
MAX_KERNEL = 1023  # pooling widths (odd): far wider than the observation windows they smooth


SCOPES = ("model", "layer", "head")
TUNE_KINDS = ("int", "float", "categorical")
LAYER_FORMS = ("split", "list")
HEAD_FORMS = ("pairs", "switch")


@dataclass(frozen=True)
class Tunable:
    """How ``graphwright.tune`` may search one pass argument: a range or choices, and its scope.

    ``kind``: int, float or categorical. ``low``/``high`` (int, float) bound the search; with
    ``per_context=True`` they are fractions of the tuning context length (token counts: budgets,
    windows), turned into tokens by ``tune.space.search_space``. ``log``: sample on a log scale.
    ``choices``: the values of a categorical. ``scope``: the finest scope the argument may be
    tuned at: model (one value for the whole model), layer (one value per layer, for a pass
    with a ``layers=`` argument: ``tune(scope="layer")`` splits it into one instance per layer) or
    head (one choice per (layer, KV head); needs ``head_form``). ``layer_form``: how layer-scope
    values reach the recipe: "split" (one pass instance per layer with ``layers=[l]``) or "list" (one
    instance, the argument a list with one value per layer in layer order: ``lowrank_kv(keep=[...])``).
    ``head_form``: how head-scope choices reach the recipe: "pairs" (one yes/no per (layer, KV head);
    the argument becomes the list of ``[layer, kv_head]`` pairs chosen: ``duo(retrieval=[[0, 1], ...])``)
    or "switch" (a categorical that decides how a layer's budget is split over its KV heads, searched
    only at head scope, one value per layer: ``snapkv(heads="adaptive", layers=[3])``; at model and layer
    scope it keeps its default and is not searched).
    At model scope a "pairs" argument keeps its own kind and range (``duo``: a retrieval fraction).
    ``requires``: (argument, value) the template must set for this one to be searched (it means nothing
    otherwise): ``snapkv.gamma`` only with ``heads="scores"``.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    scope: str = "model"
    per_context: bool = False
    layer_form: str = "split"
    head_form: str | None = None
    requires: tuple | None = None

    def __post_init__(self):
        if self.kind not in TUNE_KINDS:
            raise ValueError(f"Tunable kind must be one of {list(TUNE_KINDS)}; got {self.kind!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"Tunable scope must be one of {list(SCOPES)}; got {self.scope!r}")
        if self.layer_form not in LAYER_FORMS:
            raise ValueError(f"Tunable layer_form must be one of {list(LAYER_FORMS)}; got {self.layer_form!r}")
        if (self.scope == "head") != (self.head_form is not None) or self.head_form not in (None, *HEAD_FORMS):
            raise ValueError(f"a head-scope Tunable needs head_form in {list(HEAD_FORMS)} (and only a head-scope one takes it); "
                             f"got scope={self.scope!r}, head_form={self.head_form!r}")
        if self.requires is not None and not (isinstance(self.requires, tuple) and len(self.requires) == 2
                                              and isinstance(self.requires[0], str)):
            raise ValueError(f"Tunable requires must be an (argument name, value) pair; got {self.requires!r}")
        if self.head_form == "switch" and self.kind != "categorical":
            raise ValueError(f"a head_form 'switch' Tunable is categorical (the per-head budget rules to choose from); got kind {self.kind!r}")
        if self.kind == "categorical":
            if not self.choices:
                raise ValueError("a categorical Tunable needs choices")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.kind} Tunable needs low < high; got low={self.low!r}, high={self.high!r}")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log-scale Tunable needs low > 0; got {self.low!r}")


@dataclass(frozen=True)
class Arg:
    """One declared pass argument: type, default, allowed range or choices, and a one-line doc.

    ``type`` is one of ``bool, int, float, str, list, dict`` or a tuple of them (e.g.
    ``(int, float)`` for "a fraction or a token count"). ``default=None`` with
    ``required=False`` means "computed by the pass when not given".
    """

    name: str
    type: Any
    default: Any = None
    doc: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    required: bool = False
    tune: Tunable | None = None  # searchable by ``graphwright.tune`` over this range (None: not tuned)


@dataclass
class PassContext:
    """What passes may read besides the graph: the source model, tokenizer and calibration data."""

    model: Any = None
    tokenizer: Any = None
    calibration_ids: Any = None  # LongTensor [B, T] of calibration text, when a pass profiles
    lower: Any = None  # lower(gm) -> callable: gm lowered to the chosen backend (None: run gm as captured)
    extra: dict = field(default_factory=dict)


class Pass:
    """Base class of rewrite passes. Subclasses set ``name``, ``exact``, ``args`` and ``run``."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    args: ClassVar[tuple[Arg, ...]] = ()
    doc: ClassVar[str] = ""
    # What the pass needs of the graph and does to it, as per-layer facts (``passes/manager.py``
    # orders recipes from these; ``manager.FACTS`` lists the vocabulary).
    needs: ClassVar[frozenset] = frozenset()
    produces: ClassVar[frozenset] = frozenset()
    removes: ClassVar[frozenset] = frozenset()
    forbids: ClassVar[frozenset] = frozenset()
    excludes: ClassVar[dict] = {}
    also_on: ClassVar[dict] = {}  # {fact: reason}: applies to a layer with that fact in place of ``needs`` (manager.py)
    stage: ClassVar[int] = 50  # tie-break only: lower runs first when nothing else decides
    model_level: ClassVar[bool] = False  # acts on the model as a whole (fuse_moe), not on attention layers
    # Examples the registry-driven suite runs (``tests/passes/test_registry_suite.py``): a recipe string
    # at the exact setting (None when the pass has none that applies to a short probe), a lossy one, and
    # the tiny models it applies to. A registered pass without examples fails the suite.
    examples: ClassVar[dict] = {}

    def layer_set(self, info) -> set | None:
        """The layers this pass rewrites (None: every layer, or the model as a whole)."""
        layers = self.values.get("layers") if isinstance(getattr(self, "values", None), dict) else None
        return None if layers is None else {int(x) for x in layers}

    def __init__(self, **values):
        self.values = validate_args(self.name, self.args, values)

    def __getattr__(self, item):
        values = self.__dict__.get("values", {})
        if item in values:
            return values[item]
        raise AttributeError(item)

    def applies_to(self, sg) -> str | None:
        """None when the pass applies to this graph; otherwise the reason it does not."""
        return None

    def is_identity(self) -> bool:
        """True when these argument values make the pass exact (its 'exact setting')."""
        return self.exact

    def run(self, sg, ctx: PassContext):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.values.items())})"


PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under ``cls.name``."""
    if not cls.name or cls.name in PASS_REGISTRY:
        raise ValueError(f"pass name {cls.name!r} is empty or already registered")
    PASS_REGISTRY[cls.name] = cls
    return cls


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return getattr(t, "__name__", str(t))


def _check_type(pass_name: str, arg: Arg, value):
    types = arg.type if isinstance(arg.type, tuple) else (arg.type,)
    ok = False
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = True
            if int not in types:
                value = float(value)
            break
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            ok = True
            break
        if t not in (int, float) and isinstance(value, t):
            ok = True
            break
    if not ok:
        raise RecipeError(f"{pass_name}: argument {arg.name!r} must be {_type_name(arg.type)}; got {value!r} ({type(value).__name__})")
    if arg.choices is not None and value not in arg.choices:
        raise RecipeError(f"{pass_name}: argument {arg.name!r} must be one of {list(arg.choices)}; got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:  # NaN
            raise RecipeError(f"{pass_name}: argument {arg.name!r} must be a number; got NaN")
        lo = "-inf" if arg.min is None else arg.min
        hi = "inf" if arg.max is None else arg.max
        if (arg.min is not None and value < arg.min) or (arg.max is not None and value > arg.max):
            raise RecipeError(f"{pass_name}: argument {arg.name!r} = {value!r} is out of range [{lo}, {hi}]")
    return value


def validate_args(pass_name: str, declared: tuple[Arg, ...], values: dict) -> dict:
    """Check names, types and ranges; fill defaults. Raises ``RecipeError`` naming the problem."""
    by_name = {a.name: a for a in declared}
    unknown = [k for k in values if k not in by_name]
    if unknown:
        import difflib

        valid = ", ".join(by_name) or "(none)"
        close = difflib.get_close_matches(unknown[0], list(by_name), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{pass_name}: unknown argument {unknown[0]!r}{hint}; valid arguments: {valid}")
    out = {}
    for a in declared:
        if a.name in values and values[a.name] is not None:
            out[a.name] = _check_type(pass_name, a, values[a.name])
        elif a.required:
            raise RecipeError(f"{pass_name}: argument {a.name!r} is required ({a.doc})")
        else:
            out[a.name] = a.default
    return out


def instantiate(recipe) -> list:
    """The Pass objects of a parsed ``Recipe``, in order; RecipeError for unknown passes and invalid arguments."""
    from .. import passes as _registers_passes  # noqa: F401  (same package: importing registers every pass)
    from ..recipes.recipe import PLANNED_PASSES, thaw

    out = []
    for name, args in recipe.passes:
        cls = PASS_REGISTRY.get(name)
        valid = ", ".join(sorted(PASS_REGISTRY))
        if cls is None and name in PLANNED_PASSES:
            raise RecipeError(f"pass {name!r} is not implemented yet; implemented passes: {valid}")
        if cls is None:
            close = difflib.get_close_matches(name, sorted(set(PASS_REGISTRY) | set(PLANNED_PASSES)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown pass {name!r}{hint}; valid passes: {valid}")
        values = {k: thaw(v) for k, v in args}
        validate_args(name, cls.args, values)  # first, so no keyword can clash with __init__'s own
        out.append(cls(**values))
    return out
