"""Errors graphwright raises on purpose.

Every error names what is wrong and what is allowed; nothing deep inside torch should be the
first thing a user sees for bad input.
"""


class GraphwrightError(Exception):
    """Base class of every error graphwright raises on purpose."""


class RecipeError(GraphwrightError, ValueError):
    """A recipe names an unknown pass or argument, a bad value, or a pass that does not apply."""


class CaptureError(GraphwrightError, RuntimeError):
    """A model (or one of its modules) cannot be captured into a step graph; names the module."""


class ModelLoadError(GraphwrightError, ValueError):
    """A model name, folder or file cannot be loaded (missing, corrupt, unknown)."""
