"""Peak memory of one measured call: the process's resident set, sampled by a background thread.

CPU torch has no allocator statistics (``torch.cuda.max_memory_allocated`` is CUDA only), and
``ru_maxrss`` only ever grows over the whole process, so it cannot tell two alternating runs
apart. A thread polling the RSS every millisecond (psutil, which accelerate already pulls in)
gives the peak *increase* over the RSS at entry for each run separately. On CUDA the allocator's
own peak is used instead. Allocations shorter than the poll interval can be missed; numbers are
for comparing sides of one benchmark, not absolute accounting.
"""

from __future__ import annotations

import threading

import psutil
import torch

POLL_S = 0.001


class PeakMemory:
    """``with PeakMemory(device) as m: ...``; then ``m.peak_bytes`` is the peak increase during the block."""

    def __init__(self, device="cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _poll(self, proc, base):
        peak = base
        while not self._stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            self._stop.wait(POLL_S)
        self.peak_bytes = max(0, max(peak, proc.memory_info().rss) - base)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        proc = psutil.Process()
        self._thread = threading.Thread(target=self._poll, args=(proc, proc.memory_info().rss), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return False
        self._stop.set()
        self._thread.join()
        return False
