"""``Recipe``: an ordered list of passes with their arguments, as an immutable, comparable value.

Recipes are plain data so they can be written by hand, stored next to results, compared and
printed back. Every accepted form parses to the same value:

* the string form ``"lowrank_kv(keep=0.5) + fastgen(recovery=0.95)"`` (grammar in
  ``grammar.py``); ``""`` and ``"identity"`` are the empty recipe;
* a list of dicts ``[{"pass": "lowrank_kv", "keep": 0.5}, {"pass": "fastgen", "recovery": 0.95}]``;
* a path to a TOML file (``str`` ending in ``.toml`` or a ``pathlib.Path``)::

      # one [[pass]] table per pass, in order; "name" is the pass, every other key an argument
      [[pass]]
      name = "lowrank_kv"
      keep = 0.5

      [[pass]]
      name = "steer"
      heads = {0 = [1, 2], 3 = [4]}   # TOML keys are strings: keys that are integers become ints

  No other top-level keys are allowed, and an argument called ``name`` cannot be written in
  TOML (use the string or list form);
* an existing ``Recipe`` (returned as is) or ``None`` (empty).

Values are normalised to hashable forms (lists -> tuples, dicts -> ``FrozenDict``) so recipes
can be compared and used as dict keys. Equality is by type as well as value: ``keep=1`` and
``keep=1.0`` are different recipes (they print differently), as are ``x=true`` and ``x=1``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import RecipeError
from .grammar import _BOOLS, MAX_DEPTH, MAX_INT, MAX_LENGTH, parse_string

# Passes the design names that may not be registered yet: asking for one is "not implemented
# yet", which is a different answer from "no such pass". A registered pass always wins.
PLANNED_PASSES = ("lowrank_kv", "fastgen", "h2o", "snapkv", "streaming", "steer", "block_sparse",
                  "window", "gemfilter", "fuse_moe")
IDENTITY = "identity"  # the name of the empty recipe; dropped wherever it appears without args
LIST_KEY = "pass"  # the key naming the pass in the list-of-dicts form (so not an argument name)
TOML_KEY = "name"  # the key naming the pass in a TOML [[pass]] table
MAX_TOML_BYTES = 1_000_000

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")


class FrozenDict(Mapping):
    """An immutable, hashable dict with int or str keys, kept sorted (ints first) for printing."""

    __slots__ = ("_items", "_map")

    def __init__(self, items=()):
        items = dict(items)
        self._items = tuple(sorted(items.items(), key=lambda kv: (isinstance(kv[0], str), kv[0])))
        self._map = dict(self._items)

    def __getitem__(self, key):
        return self._map[key]

    def __iter__(self):
        return (k for k, _ in self._items)

    def __len__(self):
        return len(self._items)

    def __eq__(self, other):
        return isinstance(other, FrozenDict) and typed_key(self) == typed_key(other)

    def __hash__(self):
        return hash(typed_key(self))

    def __repr__(self):
        return "FrozenDict({" + ", ".join(f"{k!r}: {v!r}" for k, v in self._items) + "})"


def typed_key(v):
    """A key that compares values by type and content (so ``True != 1`` and ``1 != 1.0``)."""
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, int):
        return ("i", v)
    if isinstance(v, float):
        return ("f", v)
    if isinstance(v, str):
        return ("s", v)
    if isinstance(v, tuple):
        return ("l", tuple(typed_key(x) for x in v))
    if isinstance(v, FrozenDict):
        return ("d", tuple((typed_key(k), typed_key(x)) for k, x in v._items))
    raise TypeError(f"not a normalised recipe value: {v!r}")


def freeze(v, where: str, depth: int = 0):
    """Normalise one argument value to bool/int/float/str/tuple/FrozenDict; RecipeError otherwise."""
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral):
        v = int(v)
        if abs(v) > MAX_INT:
            raise RecipeError(f"{where}: integer {v} is out of range (at most {MAX_INT} in magnitude)")
        return v
    if isinstance(v, numbers.Real):
        try:
            v = float(v)  # a Fraction or Decimal-like value beyond the float range overflows here
        except (OverflowError, ValueError, TypeError):
            raise RecipeError(f"{where}: {str(v)[:40]} is out of the float range (at most about 1.8e308 in magnitude)") from None
        if not math.isfinite(v):
            raise RecipeError(f"{where}: {v} is not allowed (numbers must be finite, not NaN or inf)")
        return v
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, Mapping)):
        if depth >= MAX_DEPTH:
            raise RecipeError(f"{where}: value nested deeper than {MAX_DEPTH} levels of lists/dicts")
        if not isinstance(v, Mapping):
            return tuple(freeze(x, where, depth + 1) for x in v)
        out = {}
        for k, x in v.items():
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise RecipeError(f"{where}: dict key {k!r} must be an int or a string")
            out[freeze(k, where)] = freeze(x, where, depth + 1)
        return FrozenDict(out)
    if v is None:
        raise RecipeError(f"{where}: null/None is not a value; leave the argument out to use its default")
    raise RecipeError(f"{where}: unsupported value {v!r} of type {type(v).__name__}; "
                      "use numbers, true/false, strings, lists or dicts")


def thaw(v):
    """The plain Python form of a normalised value (tuples -> lists, FrozenDict -> dict)."""
    if isinstance(v, tuple):
        return [thaw(x) for x in v]
    if isinstance(v, FrozenDict):
        return {k: thaw(x) for k, x in v.items()}
    return v


def quote(s: str) -> str:
    """A double-quoted string literal the grammar reads back to ``s`` (non-printables escaped)."""
    out = ['"']
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[c])
        elif c.isprintable():
            out.append(c)
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    out.append('"')
    return "".join(out)


def format_value(v) -> str:
    """The canonical string-form spelling of a normalised value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float; always has '.' or 'e'
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, FrozenDict):
        return "{" + ", ".join(f"{format_value(k)}: {format_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"not a normalised recipe value: {v!r}")


def _check_name(name, what: str, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _BOOLS:
        raise RecipeError(f"{where}: {what} {name!r} is not a valid name (ASCII letters, digits and _, not starting with a digit)")
    return name


def _normalise(entries) -> tuple:
    """(name, args) pairs from any form -> the canonical tuple; drops argument-less ``identity``."""
    out = []
    for i, entry in enumerate(entries):
        try:
            name, args = entry
        except (TypeError, ValueError):
            raise RecipeError(f"recipe entry {i}: expected (name, args); got {entry!r:.80}") from None
        where = f"recipe entry {i}"
        _check_name(name, "pass name", where)
        where = f"pass {name!r} (entry {i})"
        pairs = list(args.items()) if isinstance(args, Mapping) else list(args)
        seen = set()
        frozen = []
        for pair in pairs:
            try:
                k, v = pair
            except (TypeError, ValueError):
                raise RecipeError(f"{where}: expected (argument, value) pairs; got {pair!r:.80}") from None
            _check_name(k, "argument name", where)
            if k == LIST_KEY:
                raise RecipeError(f"{where}: {LIST_KEY!r} cannot be an argument name (it names the pass in the list form)")
            if k in seen:
                raise RecipeError(f"{where}: duplicate argument {k!r}")
            seen.add(k)
            frozen.append((k, freeze(v, f"{where}, argument {k!r}")))
        if name == IDENTITY:
            if frozen:
                raise RecipeError(f"{where}: 'identity' (the empty recipe) takes no arguments")
            continue
        out.append((name, tuple(sorted(frozen))))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class Recipe:
    """An ordered tuple of ``(pass name, ((arg, value), ...))`` with args sorted by name.

    Build one with ``Recipe.parse(x)``; ``str(r)`` is the canonical string form and
    ``Recipe.parse(str(r)) == r``; ``r.to_list()`` the list-of-dicts form; ``r.to_toml()`` the
    TOML form; ``graphwright.passes.base.instantiate(r)`` the ``Pass`` objects.
    """

    passes: tuple = ()

    def __post_init__(self):
        # Any construction path (parse, direct, +) goes through the same checks and normalisation.
        object.__setattr__(self, "passes", _normalise(self.passes))
        # The same bound as the string parser, on every form: a Recipe always prints to a string that parses back.
        if (n := len(str(self))) > MAX_LENGTH:
            raise RecipeError(f"recipe is {n} characters long in its string form; at most {MAX_LENGTH} are accepted "
                              "(the string parser's limit, kept for every form so a recipe always prints to a string that parses back)")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def parse(cls, x) -> "Recipe":
        """A Recipe from a string, a list of dicts, a ``.toml`` path, a Recipe or None."""
        if isinstance(x, Recipe):
            return x
        if x is None:
            return cls()
        if isinstance(x, os.PathLike):
            return cls.from_toml(x)
        if isinstance(x, str):
            s = x.strip()
            if s.lower().endswith(".toml") and "\n" not in s:
                return cls.from_toml(s)
            return cls.from_string(x)
        if isinstance(x, (list, tuple)):
            return cls.from_list(x)
        raise RecipeError(f"a recipe must be a string, a list of dicts, a .toml path, a Recipe or None; "
                          f"got {type(x).__name__}")

    @classmethod
    def from_string(cls, text: str) -> "Recipe":
        return cls(tuple(parse_string(text)))

    @classmethod
    def from_list(cls, items) -> "Recipe":
        """``[{"pass": name, arg: value, ...}, ...]`` -> Recipe."""
        entries = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise RecipeError(f"recipe entry {i}: expected a dict like {{'pass': 'noop'}}; got {type(item).__name__}")
            if LIST_KEY not in item:
                raise RecipeError(f"recipe entry {i}: missing the {LIST_KEY!r} key naming the pass; got keys {sorted(map(str, item))}")
            entries.append((item[LIST_KEY], [(k, v) for k, v in item.items() if k != LIST_KEY]))
        return cls(tuple(entries))

    @classmethod
    def from_toml(cls, path) -> "Recipe":
        """A recipe from a TOML file of ``[[pass]]`` tables (format in the module docstring)."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise RecipeError(f"recipe file not found: {path}")
        if os.path.getsize(path) > MAX_TOML_BYTES:
            raise RecipeError(f"recipe file {path} is larger than {MAX_TOML_BYTES} bytes")
        try:
            with open(path, "rb") as f:
                doc = tomllib.loads(f.read().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe file {path} is not UTF-8 text: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"recipe file {path} is not valid TOML: {e}") from None
        except RecursionError:  # tomllib recurses once per nested array or inline table
            raise RecipeError(f"recipe file {path}: values nested too deeply for the TOML reader; "
                              f"recipe values may nest at most {MAX_DEPTH} levels of lists/dicts") from None
        return cls.from_toml_data(doc, source=path)

    @classmethod
    def from_toml_data(cls, doc: Mapping, source: str = "TOML") -> "Recipe":
        """The parsed TOML document ``{"pass": [{"name": ..., args...}, ...]}`` -> Recipe."""
        extra = [k for k in doc if k != "pass"]
        if extra:
            raise RecipeError(f"{source}: unexpected top-level key {extra[0]!r}; a recipe file holds only [[pass]] tables")
        tables = doc.get("pass", [])
        if not isinstance(tables, list):
            raise RecipeError(f"{source}: 'pass' must be an array of tables written [[pass]]")
        entries = []
        for i, t in enumerate(tables):
            if not isinstance(t, Mapping) or TOML_KEY not in t:
                raise RecipeError(f"{source}: [[pass]] table {i} needs {TOML_KEY} = \"<pass name>\"")
            entries.append((t[TOML_KEY], [(k, _int_keys(v)) for k, v in t.items() if k != TOML_KEY]))
        return cls(tuple(entries))

    # -- output ---------------------------------------------------------------------------
    def __str__(self) -> str:
        if not self.passes:
            return IDENTITY
        parts = []
        for name, args in self.passes:
            inner = ", ".join(f"{k}={format_value(v)}" for k, v in args)
            parts.append(f"{name}({inner})" if args else name)
        return " + ".join(parts)

    def __repr__(self) -> str:
        return f"Recipe({str(self)!r})"

    def to_list(self) -> list[dict]:
        """The list-of-dicts form with plain lists and dicts: ``[{"pass": "noop"}, ...]``."""
        return [{LIST_KEY: name, **{k: thaw(v) for k, v in args}} for name, args in self.passes]

    def to_toml(self) -> str:
        """The TOML form (``[[pass]]`` tables); RecipeError for what TOML cannot say."""
        lines = []
        for name, args in self.passes:
            lines += ["[[pass]]", f"{TOML_KEY} = {_toml_value(name)}"]
            for k, v in args:
                if k == TOML_KEY:
                    raise RecipeError(f"pass {name!r}: an argument called {TOML_KEY!r} cannot be written in TOML")
                lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
        return "\n".join(lines)

    # -- value semantics ------------------------------------------------------------------
    def _key(self):
        return tuple((name, tuple((k, typed_key(v)) for k, v in args)) for name, args in self.passes)

    def __eq__(self, other):
        return isinstance(other, Recipe) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __len__(self) -> int:
        return len(self.passes)

    def __add__(self, other) -> "Recipe":
        """Run ``self`` then ``other`` (anything ``parse`` accepts)."""
        return Recipe(self.passes + Recipe.parse(other).passes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.passes)


def _int_keys(v, depth: int = 0):
    """TOML keys are always strings: turn canonical integer keys ("0", "-3") back into ints."""
    if isinstance(v, (Mapping, list)) and depth >= MAX_DEPTH:
        raise RecipeError(f"TOML value nested deeper than {MAX_DEPTH} levels of lists/dicts")
    if isinstance(v, Mapping):
        return {(_toml_key(k)): _int_keys(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list):
        return [_int_keys(x, depth + 1) for x in v]
    return v


def _toml_key(k):
    if isinstance(k, str) and _CANONICAL_INT.fullmatch(k):
        if len(k.lstrip("-")) > 19 or abs(int(k)) > MAX_INT:
            raise RecipeError(f"TOML dict key {k[:40]} is out of range (at most {MAX_INT} in magnitude)")
        return int(k)
    return k


def _toml_value(v) -> str:
    if isinstance(v, str):
        return quote(v)  # our escapes (\\ \" \n \t \r \uXXXX \UXXXXXXXX) are valid TOML basic-string escapes
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, FrozenDict):
        keys = [str(k) for k in v]
        if len(set(keys)) != len(keys) or any(isinstance(k, str) and _CANONICAL_INT.fullmatch(k) for k in v):
            raise RecipeError(f"dict {format_value(v)} mixes int keys with equal-looking string keys; TOML cannot tell them apart")
        return "{" + ", ".join(f"{k if isinstance(k, int) else quote(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return format_value(v)
