"""A/B of ``codegen/onnx/reference_threads.py``: the export verification's torch reference with and without one
intra-op thread per small step, alternating in one process.

Usage: python bench/verify_threads.py [--model smollm2-135m] [--recipe NAME_OR_RECIPE ...] [--context 256] [--rounds 3]

For each recipe (names of ``bench/bench_decode.py``, budgets for a ``--context``-token prompt) the model is compiled
once, ``torch_reference`` (the probe's prefill + 3 greedy decode steps, what ``export_onnx`` verifies against) runs
once to warm up, then ``--rounds`` times with ``reference_threads.ENABLED`` off and on alternately. Prints this
process's CPU seconds and wall seconds per run, the load average before and after, and the max |logit| difference
between the two columns' references. On a shared machine read CPU seconds, and label the figures loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import graphwright as gw
from graphwright.codegen.onnx import reference_threads
from graphwright.codegen.onnx.export import torch_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import recipe_text  # noqa: E402


def timed(cm) -> tuple[float, float, dict]:
    c0, w0 = time.process_time(), time.perf_counter()
    ref = torch_reference(cm)
    return time.process_time() - c0, time.perf_counter() - w0, ref


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", action="append", default=None)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    for name in a.recipe or ["identity"]:
        text = recipe_text(name, a.context)
        cm = gw.compile(a.model, text)
        timed(cm)
        load0 = os.getloadavg()[0]
        cols = {False: [], True: []}
        refs = {}
        for _ in range(a.rounds):
            for enabled in (False, True):
                reference_threads.ENABLED = enabled
                cpu, wall, refs[enabled] = timed(cm)
                cols[enabled].append((cpu, wall))
        reference_threads.ENABLED = True
        diff = max(float((x[1] - y[1]).abs().max()) for x, y in zip(refs[True]["steps"], refs[False]["steps"]))
        tokens = [int(n) for n in refs[True]["mask"].sum(1)]
        print(f"{name} = {text}: probe rows {tokens} + 3 decode steps, torch threads {torch.get_num_threads()}, "
              f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}, max |dlogit| on/off {diff:.2e}")
        for label, enabled in (("2 threads (off)", False), ("1 thread/small step (on)", True)):
            runs = "  ".join(f"{c:.2f} CPU s / {w:.2f} s" for c, w in cols[enabled])
            print(f"  {label:26s} {runs}")


if __name__ == "__main__":
    main()
