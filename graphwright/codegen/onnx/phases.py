"""Wall-clock seconds per export phase, recorded in ``graphwright.json`` under ``export.phases``.

``export_onnx`` wraps each of its phases (graph split, ``torch.export``, ONNX translation, the
onnxscript optimizer, save, checker, verification, ...) in ``with phases("name"):``; the record
tells where an export's time went without a profiler (``bench/bench_export.py`` prints it as a
table). Informative only: nothing reads it back.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class Phases:
    """Ordered ``{phase: seconds}``; a phase entered twice accumulates."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def to_json(self) -> dict:
        """``{"phases": {name: s}, "total_s": wall time since creation}`` rounded to 10 ms."""
        return {"phases": {k: round(v, 2) for k, v in self.seconds.items()},
                "total_s": round(time.perf_counter() - self._t0, 2)}
