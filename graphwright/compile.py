"""``graphwright.compile``: capture, rewrite with a recipe, lower, verify."""

from __future__ import annotations

from .capture import capture
from .codegen.backends import BACKENDS, Backend, get_backend
from .compiled import CompiledModel
from .models import load_model
from .models.dtypes import parse_dtype
from .verify import run_recipe

__all__ = ["BACKENDS", "compile"]


def compile(model, recipe=None, tokenizer=None, backend: str | Backend = "torch", dtype=None,  # noqa: A001
            verify: bool = True, verify_tokens: int | None = None) -> CompiledModel:
    """Capture ``model`` as a step graph, apply ``recipe`` and return a ``CompiledModel``.

    ``model``: an HF causal LM, or anything ``load_model`` takes (a built-in name, a folder, a
    GGUF file). ``recipe``: None (identity), a recipe string, a list of dicts, a TOML path or a
    ``Recipe``. ``backend``: a name in ``graphwright.codegen.backends.BACKENDS`` (or a ``Backend``);
    every pass is verified on it. ``dtype``: cast the model first. ``verify_tokens``: cap on the
    verification probe's prompt (default 128); a token budget above it is not exceeded at compile
    time and is listed in ``cm.verification["probe"]["uncrossed"]``: raise the cap to exercise it.
    """
    chosen = get_backend(backend)
    dtype = parse_dtype(dtype)
    if not hasattr(model, "forward"):
        model, loaded_tok = load_model(model, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    elif dtype is not None and next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    chosen.require(model)
    sg = capture(model)
    sg, parsed, verification = run_recipe(sg, recipe, model=model, tokenizer=tokenizer, verify=verify, backend=chosen,
                                         verify_tokens=verify_tokens)
    cm = CompiledModel(sg, tokenizer=tokenizer, recipe=parsed, backend=chosen, source=model)
    cm.verification = verification
    return cm
