"""Built-in models and ``load_model``."""

from .load import BUILTIN_MODELS, REAL_MODELS, load_model
from .tiny import TINY_MODELS, tiny_model

__all__ = ["BUILTIN_MODELS", "REAL_MODELS", "TINY_MODELS", "load_model", "tiny_model"]
