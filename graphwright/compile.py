"""``graphwright.compile``: capture, rewrite with a recipe, lower, verify."""

from __future__ import annotations

from .capture import capture
from .compiled import CompiledModel
from .models import load_model
from .models.dtypes import parse_dtype

BACKENDS = ("torch", "reference", "triton")


def compile(model, recipe=None, tokenizer=None, backend: str = "torch", dtype=None, verify: bool = True) -> CompiledModel:  # noqa: A001
    """Capture ``model`` as a step graph, apply ``recipe`` and return a ``CompiledModel``.

    ``model``: an HF causal LM, or anything ``load_model`` takes (a built-in name, a folder, a
    GGUF file). ``recipe``: None (identity), a recipe string, a list of dicts, a TOML path or a
    ``Recipe``. ``backend``: one of ``BACKENDS``. ``dtype``: cast the model first.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    dtype = parse_dtype(dtype)
    if not hasattr(model, "forward"):
        model, loaded_tok = load_model(model, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    elif dtype is not None and next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    if backend == "triton":
        _check_triton_device(model)
    sg = capture(model)
    from .passes.pipeline import run_recipe

    sg, parsed, verification = run_recipe(sg, recipe, model=model, tokenizer=tokenizer, verify=verify)
    cm = CompiledModel(sg, tokenizer=tokenizer, recipe=parsed, backend=backend, source=model)
    cm.verification = verification
    return cm


def _check_triton_device(model) -> None:
    """Triton kernels need CUDA tensors, or the interpreter (``TRITON_INTERPRET=1``, tests only)."""
    import os

    device = next(model.parameters()).device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs the model on a CUDA device (it is on {device.type}); "
                         "on CPU use backend='torch' (or set TRITON_INTERPRET=1 to run the kernels in the "
                         "Triton interpreter: correct but slow, for tests)")
