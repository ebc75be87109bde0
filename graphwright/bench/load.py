"""Was the machine quiet while we measured? CPU time used by *other* processes during a block.

A benchmark on a shared 2-core machine is only a result when nothing else ran: a timing taken
while a test suite shared the cores once made HF decode at 2.9 tokens/s instead of ~14. The load
average alone cannot tell (it counts our own threads and lags by a minute), so ``MachineLoad``
also reads the system's busy CPU seconds (``psutil.cpu_times``) and this process's own CPU
seconds (``psutil.Process().cpu_times``, children included) at entry and exit: the difference,
divided by wall time x cores, is the share of the machine that other processes used.

``busy`` is True when that foreign share exceeds ``max_foreign`` (default 10% of the machine) or
something was already running when we started: the foreign share of the seconds just before
(``foreign_before``, measured by ``wait_for_quiet``) exceeded ``max_foreign``, or, where no such
measurement was passed, the 1-minute load average at entry exceeded ``max_load_before`` (default
0.5). The load average counts this process's own threads for a minute after they ran (a block that
compiled or exported its sides just before measuring reads "loaded" with nothing else running), so
``wait_for_quiet`` waits on the foreign share, not on the load average. Benchmarks report
``as_dict()`` beside their numbers and refuse to present a busy run as a result.
"""

from __future__ import annotations

import os
import time

import psutil


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(getattr(t, f) for f in ("user", "nice", "system", "irq", "softirq", "steal") if hasattr(t, f))


def _own_seconds() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class MachineLoad:
    """``with MachineLoad() as load: ...``; then ``load.busy``, ``load.foreign_share``, ``load.as_dict()``."""

    def __init__(self, max_foreign: float = 0.10, max_load_before: float = 0.5, foreign_before: float | None = None):
        self.max_foreign = max_foreign
        self.max_load_before = max_load_before
        self.foreign_before = foreign_before  # other processes' share of the seconds before entry (wait_for_quiet)
        self.cores = psutil.cpu_count() or 1

    def __enter__(self):
        self.load_before = os.getloadavg()
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        busy, own = _busy_seconds() - self._busy, _own_seconds() - self._own
        self.wall_s = wall
        self.own_cpu_s = own
        self.foreign_cpu_s = max(0.0, busy - own)
        self.foreign_share = self.foreign_cpu_s / (wall * self.cores) if wall > 0 else 0.0
        self.load_after = os.getloadavg()
        return False

    @property
    def busy(self) -> bool:
        if self.foreign_before is not None:
            started_busy = self.foreign_before > self.max_foreign
        else:
            started_busy = self.load_before[0] > self.max_load_before
        return self.foreign_share > self.max_foreign or started_busy

    def as_dict(self) -> dict:
        return {"cores": self.cores, "wall_s": self.wall_s, "own_cpu_s": self.own_cpu_s,
                "foreign_cpu_s": self.foreign_cpu_s, "foreign_share": self.foreign_share,
                "load_before": list(self.load_before), "load_after": list(self.load_after),
                "foreign_before": self.foreign_before, "max_foreign": self.max_foreign,
                "max_load_before": self.max_load_before, "busy": self.busy}


def foreign_share(window_s: float) -> float:
    """The share of the machine (0-1, clipped) that processes other than this one used over the next ``window_s``
    seconds: ``MachineLoad``'s measure over a sleep."""
    with MachineLoad() as load:
        time.sleep(window_s)
    return min(1.0, load.foreign_share)  # the two clocks are sampled apart: a saturated machine can read a hair over 1


def wait_for_quiet(max_foreign: float = 0.10, timeout_s: float = 300.0, poll_s: float = 10.0) -> float:
    """Wait until other processes used at most ``max_foreign`` of the machine over a ``poll_s`` window, or until
    ``timeout_s``; returns the last window's share (pass it to ``MachineLoad(foreign_before=...)``; above
    ``max_foreign`` means the wait timed out). Not the load average: it would count this process's own threads
    (e.g. a compile just before) for a minute."""
    end = time.monotonic() + timeout_s
    while True:
        share = foreign_share(poll_s)
        if share <= max_foreign or time.monotonic() > end:
            return share
