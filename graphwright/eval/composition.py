"""The composition matrix: every ordered pair of passes, compiled and generated on one model.

Each pass uses its registered lossy example. A cell is ``ok`` (the pair compiles and generates in
that written order), ``refused`` (a ``RecipeError`` found before any graph surgery, with its reason)
or ``error`` (anything else: a bug). Exactness of composed exact settings is checked by the registry
suite, not here. ``graphwright compile --matrix`` prints it and the
README keeps the result; ``tests/passes/test_registry_suite.py`` asserts there is no ``error``.
"""

from __future__ import annotations

import itertools

import torch

from ..errors import RecipeError


def registry_settings() -> dict:
    """{pass: recipe} -- each registered pass's declared lossy example (its exact one if it has none)."""
    from .. import passes as _registers  # noqa: F401
    from ..passes.base import PASS_REGISTRY

    out = {}
    for name, cls in PASS_REGISTRY.items():
        ex = cls.examples or {}
        if ex.get("lossy") or ex.get("exact"):
            out[name] = ex.get("lossy") or ex.get("exact")
    return out


DEFAULT_PASSES = ("lowrank_kv", "h2o", "snapkv", "streaming", "fastgen", "steer", "window", "block_sparse", "gemfilter")


def _prompt(sg_info, length: int = 12, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, sg_info.vocab_size, (1, length), generator=g)


def try_recipe(model, recipe: str, ids: torch.Tensor, new_tokens: int = 6) -> dict:
    """Compile and generate; returns {"status", "reason", "tokens"}."""
    from ..compile import compile as compile_model

    try:
        cm = compile_model(model, recipe=recipe)
        out = cm.generate(ids, max_new_tokens=new_tokens)
        return {"status": "ok", "reason": "", "tokens": out[0, ids.shape[1]:].tolist()}
    except RecipeError as exc:
        return {"status": "refused", "reason": str(exc), "tokens": None}
    except Exception as exc:  # noqa: BLE001 - the matrix reports every failure, it must not stop at one
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "tokens": None}


def composition_matrix(model, passes=DEFAULT_PASSES, settings=None, new_tokens: int = 6) -> dict:
    """{(a, b): cell} for every ordered pair of ``passes`` on ``model`` (a model object)."""
    from ..capture import capture

    settings = {**registry_settings(), **(settings or {})}
    sg_info = capture(model).info
    ids = _prompt(sg_info)
    cells = {}
    for a, b in itertools.permutations(passes, 2):
        cells[(a, b)] = try_recipe(model, f"{settings[a]} + {settings[b]}", ids, new_tokens)
    return cells


def render_matrix(cells: dict, passes) -> str:
    """A markdown table: rows = first pass written, columns = second."""
    mark = {"ok": "ok", "refused": "refused", "error": "**error**"}
    lines = ["| first \\ second | " + " | ".join(passes) + " |", "|---" * (len(passes) + 1) + "|"]
    for a in passes:
        row = [("-" if a == b else mark[cells[(a, b)]["status"]]) for b in passes]
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    return "\n".join(lines)
