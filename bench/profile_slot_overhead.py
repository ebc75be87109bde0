"""Per-step CPU cost of slot eviction beside dense decode, robust to a shared machine.

Usage: python bench/profile_slot_overhead.py [--prompt 256] [--steps 8] [--rounds 3] [--recipes identity h2o25 streaming25 snapkv25]
       [--cprofile] [--top N]

One process, one torch thread: after one prefill per recipe (names as ``bench/bench_decode.py``), rounds of
``--steps`` greedy decode steps alternate between recipes; each step is timed as this thread's CPU time
(``time.thread_time``: what the step costs, not the scheduler's share, so a loaded machine inflates it
far less than wall time). Prints the median CPU ms per step and the ratio to the first recipe, the
number of aten ops one step dispatches (``torch.profiler``; load-independent), and with ``--cprofile``
the graphwright functions by cumulative thread CPU time over a few steps (where eviction's overhead sits).
``--top N`` lists each recipe's N most frequent aten ops in one step with their share of the step's aten
self CPU time. A recipe name ending in ``:rotate`` runs on the torch backend without
``streaming_rope_shift`` (StreamingLLM re-rotating every cached key per step, as before), for an A/B in one process.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import prompt_ids, recipe_text  # noqa: E402

import graphwright as gw  # noqa: E402
from graphwright.codegen.backends import TORCH  # noqa: E402
from graphwright.codegen.torch.streaming_shift import streaming_rope_shift  # noqa: E402


@torch.inference_mode()
def step(v):
    logits, v["state"] = v["cm"]._step(v["tok"], v["pos"], torch.zeros(1, dtype=torch.long), v["state"])
    v["tok"] = logits[:, -1].argmax(-1, keepdim=True)
    v["pos"] = v["pos"] + 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--recipes", nargs="+", default=["identity", "h2o25", "streaming25", "snapkv25"])
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--top", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    model, tok = gw.load_model(args.model)
    ids = prompt_ids(tok, args.prompt, model.config.vocab_size)
    P = ids.shape[1]
    sides = {}
    for r in args.recipes:
        name, _, variant = r.partition(":")
        backend = "torch" if variant != "rotate" else dataclasses.replace(
            TORCH, name="torch_rotate", transforms=tuple(t for t in TORCH.transforms if t is not streaming_rope_shift))
        cm = gw.compile(model, recipe=recipe_text(name, P), tokenizer=tok, verify=False, backend=backend)
        state = [s.empty(1, ids.device) for s in cm._runtime.specs]
        c0 = time.thread_time()
        with torch.inference_mode():
            logits, state = cm._step(ids, torch.arange(P)[None], torch.tensor([P - 1]), state)
        pre = time.thread_time() - c0
        sides[r] = {"cm": cm, "state": state, "tok": logits[:, -1].argmax(-1, keepdim=True),
                    "pos": torch.full((1, 1), P), "cpu": [], "prefill": pre}
    for _ in range(args.rounds):
        for v in sides.values():
            for _ in range(args.steps):
                c0 = time.thread_time()
                step(v)
                v["cpu"].append(time.thread_time() - c0)
    base = statistics.median(next(iter(sides.values()))["cpu"])
    print(f"prompt {P}, 1 thread, median thread-CPU ms per decode step over {args.rounds} x {args.steps} alternating steps")
    for r, v in sides.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(v)
        aten = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        n_ops = sum(e.count for e in aten)
        m = statistics.median(v["cpu"])
        print(f"  {r:12s} {1e3 * m:7.2f} ms  {base / m:5.2f}x {args.recipes[0]}  aten ops/step {n_ops:5d}  "
              f"prefill CPU {v['prefill']:.2f} s ({P / v['prefill']:.0f} tok/s)")
        if args.top:
            total = sum(e.self_cpu_time_total for e in aten) or 1.0
            for e in sorted(aten, key=lambda e: -e.count)[:args.top]:
                print(f"      {e.key:32s} {e.count:5d} calls  {100 * e.self_cpu_time_total / total:5.1f}% self CPU")
    if args.cprofile:
        for r, v in sides.items():
            pr = cProfile.Profile(time.thread_time)
            pr.enable()
            for _ in range(4):
                step(v)
            pr.disable()
            buf = io.StringIO()
            st = pstats.Stats(pr, stream=buf).sort_stats("cumulative")
            st.print_stats("graphwright", 25)
            print(f"--- cProfile (thread CPU) {r}, 4 steps")
            print("\n".join(line for line in buf.getvalue().splitlines() if "graphwright" in line or "ncalls" in line))
    load1 = os.getloadavg()
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} (CPU time per step; wall time would be the scheduler's share)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
