"""Seconds per export phase, recorded in ``graphwright.json`` under ``export``.

``export_onnx`` wraps each of its phases (graph split, ``torch.export``, ONNX translation, the
onnxscript optimizer, save, checker, verification, ...) in ``with phases("name"):``; the record
tells where an export's time went without a profiler (``bench/bench_export.py`` prints it as a
table). Both wall-clock seconds (``phases``) and this process's CPU seconds (``cpu``) are kept:
on a shared machine the wall clock grows with the load average, CPU time much less. Informative
only: nothing reads it back.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class Phases:
    """Ordered ``{phase: seconds}`` (wall and CPU); a phase entered twice accumulates."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.notes: dict[str, object] = {}
        self.other_cpu = 0.0  # CPU seconds of other processes working for this export (``merge``)
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    @contextmanager
    def __call__(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0

    def note(self, name: str, value) -> None:
        """A fact about how a phase ran (e.g. whether the decomposition retrace was skipped), kept under ``notes``."""
        self.notes[name] = value

    def merge(self, record: dict, cpu: float = 0.0) -> None:
        """Add another process's ``to_json`` record (its phases, notes and ``cpu`` + its total CPU seconds, which
        count in ``total_cpu_s``); its wall seconds overlap this process's phases (``decode_process.py``)."""
        for name, s in (record.get("phases") or {}).items():
            self.seconds[name] = self.seconds.get(name, 0.0) + s
        for name, s in (record.get("cpu") or {}).items():
            self.cpu[name] = self.cpu.get(name, 0.0) + s
        self.notes.update(record.get("notes") or {})
        self.other_cpu += float(record.get("total_cpu_s") or 0.0) + cpu

    def to_json(self) -> dict:
        """``{"phases": {name: wall s}, "cpu": {name: CPU s}, "notes", "total_s", "total_cpu_s"}`` (and
        ``other_process_cpu_s``, the part of ``total_cpu_s`` other processes spent: ``merge``), 10 ms rounding."""
        return {"phases": {k: round(v, 2) for k, v in self.seconds.items()},
                "cpu": {k: round(v, 2) for k, v in self.cpu.items()},
                "notes": dict(self.notes),
                "total_s": round(time.perf_counter() - self._t0, 2),
                "total_cpu_s": round(time.process_time() - self._c0 + self.other_cpu, 2),
                **({"other_process_cpu_s": round(self.other_cpu, 2)} if self.other_cpu else {})}


def timings_table(record: dict) -> str:
    """``graphwright.json["export"]`` as a text table: one row per phase (wall s, CPU s, share of the
    wall total), then the total and the notes. What ``graphwright export --timings`` prints."""
    phases, cpu = record.get("phases") or {}, record.get("cpu") or {}
    total = max(float(record.get("total_s") or 0.0), 1e-9)
    width = max([len("phase"), *(len(p) for p in phases)])
    lines = [f"{'phase'.ljust(width)}  {'wall s':>8}  {'CPU s':>8}  {'share':>6}"]
    for name, s in phases.items():
        c = cpu.get(name)
        lines.append(f"{name.ljust(width)}  {s:8.2f}  {'-' if c is None else f'{c:.2f}':>8}  {100 * s / total:5.0f}%")
    lines.append(f"{'total'.ljust(width)}  {record.get('total_s', 0.0):8.2f}  {record.get('total_cpu_s', 0.0):8.2f}")
    lines += [f"{name}: {value}" for name, value in (record.get("notes") or {}).items()]
    return "\n".join(lines)

