"""graphwright: a compiler for pretrained transformer LLMs.

Capture an unmodified Hugging Face model as a step graph with explicit KV state, rewrite it
with training-free passes, and run or export the result.
"""

from . import inspect  # noqa: E402  (graphwright.inspect.diff / to_networkx / render)
from .capture import capture
from .codegen.onnx.export import export_onnx
from .compile import compile  # noqa: A004
from .compiled import CompiledModel
from .errors import CaptureError, GraphwrightError, ModelLoadError, RecipeError
from .models import BUILTIN_MODELS, load_model
from .onnx_model import load
from .recipes import Recipe
from .runtime.context import Context
from .version import __version__


def tune(model, tokenizer=None, *args, **kwargs):
    """``graphwright.tune(model, tokenizer, template=..., budget=..., trials=...)``: the recipe search of
    ``graphwright.tuning.study.tune`` (Optuna NSGA-II; imported on first use, so ``import graphwright``
    does not load Optuna). Returns what that function returns."""
    from .tuning.study import tune as _tune

    return _tune(model, tokenizer, *args, **kwargs)

__all__ = ["__version__", "capture", "compile", "CompiledModel", "Context", "load_model", "BUILTIN_MODELS",
           "GraphwrightError", "RecipeError", "CaptureError", "ModelLoadError", "inspect", "Recipe",
           "export_onnx", "load", "tune"]
