"""Load a script of ``bench/`` as a module for the bench tests (``bench/`` is scripts, not a package)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name: str, register: bool = False):
    """``bench/<name>.py`` executed as module ``name``; ``bench/`` is on ``sys.path`` while it runs (scripts import
    their siblings); ``register``: also in ``sys.modules`` (for scripts whose classes must be importable by name)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod
