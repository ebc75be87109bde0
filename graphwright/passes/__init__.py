"""Rewrite passes. Importing this package registers every pass in ``PASS_REGISTRY``.

Add one import line per pass module below; the recipe machinery finds passes by name there.
"""

from . import noop  # noqa: F401
