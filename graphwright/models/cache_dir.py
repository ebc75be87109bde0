"""Where graphwright keeps converted built-in models: ``$GRAPHWRIGHT_CACHE`` or ``~/.cache/graphwright``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("GRAPHWRIGHT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphwright")
    return Path(root)
