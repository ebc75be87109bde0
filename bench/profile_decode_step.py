"""Where one decode step of the torch runtime spends its time, beside Hugging Face's decode step.

Usage:

    python bench/profile_decode_step.py --prompts 256 4096 --steps 16 --recipes identity h2o25 streaming25
    python bench/profile_decode_step.py --backends torch compiled --profile --kernel-profile

Per prompt length: prefill once per side, ``--warmup`` untimed decode steps (the compiled backend
compiles at its first), then ``--steps`` decode steps, timed one by one: median wall ms and
median process CPU ms per step (all threads; on a machine shared with other jobs the CPU time
is the steadier figure); sides alternate step by step so load drifts hit all of them.
``--backends``: graphwright backends to run each recipe on (``torch``, ``compiled``, ...);
``compiled:previous`` compiles with the session-13 Inductor settings (``PREVIOUS_CONFIG``),
``compiled:cppwrap`` adds ``cpp_wrapper`` (the step's kernel calls from C++, not Python) to
``DECODE_CONFIG``; several variants in one run alternate like the other sides. HF is
``model(next_token, past_key_values=cache)`` with its ``DynamicCache`` (what ``generate()`` runs
per step, without the logits processors); graphwright calls the lowered step graph directly
(``CompiledModel._step``, the runtime's call). ``--profile`` adds a ``torch.profiler`` table of one
more step per side (ops by self CPU time; graphwright's own Python functions appear as
``record_function`` ranges when ``--functions``), ``--kernel-profile`` makes Inductor's generated C++ kernels record themselves
(``torch._inductor.config.cpp.enable_kernel_profile``: rows ``graph_*_cpp_fused_*``), ``--cprofile`` a cProfile of the step's Python
(FX GraphModule forward, op dispatch, cache append, eviction slots).

Recipe names as in ``bench/bench_decode.py`` (``h2o25`` = ``h2o(heavy=P/8, recent=P/8)``,
``streaming25`` = 4 sinks + a window to 25% of P). Timings on a shared machine are direction only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from functools import partial
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import HFStepper, prompt_ids, recipe_text  # noqa: E402

import graphwright as gw  # noqa: E402


class GWStepper:
    """The lowered step graph called directly (``CompiledModel._step``, what the runtime calls per token), with
    ``bench_decode.HFStepper``'s interface: ``start(ids)`` prefills, ``step()`` decodes the next token greedily."""

    def __init__(self, name, cm):
        self.name, self.cm = name, cm

    def start(self, ids):
        B, T = ids.shape
        state = [s.empty(B, ids.device) for s in self.cm._runtime.specs]
        self.pos = torch.full((B, 1), T, dtype=torch.long)
        logits, self.state = self.cm._step(ids, torch.arange(T)[None].expand(B, T), torch.tensor([T - 1]), state)
        self.next = logits[:, -1].argmax(-1, keepdim=True)

    def step(self):
        logits, self.state = self.cm._step(self.next, self.pos, torch.zeros(1, dtype=torch.long), self.state)
        self.pos = self.pos + 1
        self.next = logits[:, -1].argmax(-1, keepdim=True)


def compiled_model(model, tok, recipe, backend: str):
    """``gw.compile`` on ``backend``; ``compiled:previous`` / ``compiled:cppwrap`` set the compiled step's Inductor config."""
    name, *opts = backend.split(":")
    cm = gw.compile(model, recipe=recipe, tokenizer=tok, backend=name)
    if opts:
        from graphwright.codegen.torch.compiled import DECODE_CONFIG, PREVIOUS_CONFIG, compile_decode

        configs = {"previous": PREVIOUS_CONFIG, "cppwrap": {**DECODE_CONFIG, "cpp_wrapper": True}}
        if opts[0] not in configs:
            raise SystemExit(f"unknown compiled variant {opts[0]!r}; choose from {', '.join(configs)}")
        cm._backend_step.compiler = partial(compile_decode, config=configs[opts[0]])
    return cm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, nargs="+", default=[256])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--recipes", nargs="+", default=["identity"])
    p.add_argument("--backends", nargs="+", default=["torch"])
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps per side (compiles happen here)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one step per side")
    p.add_argument("--kernel-profile", action="store_true", help="Inductor C++ kernels as profiler rows")
    p.add_argument("--cprofile", action="store_true", help="cProfile of a few steps per side")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.kernel_profile:
        torch._inductor.config.cpp.enable_kernel_profile = True
    model, tok = gw.load_model(args.model)
    model.eval()
    for P in args.prompts:
        ids = prompt_ids(tok, P, model.config.vocab_size)
        sides = [] if args.no_hf else [HFStepper(model)]
        for r in args.recipes:
            for b in args.backends:
                sides.append(GWStepper(f"{r}/{b}", compiled_model(model, tok, recipe_text(r, P), b)))
        with torch.inference_mode():
            for s in sides:
                s.start(ids)
            for s in sides:
                for _ in range(args.warmup):
                    s.step()
            times = {s.name: [] for s in sides}
            cpu = {s.name: [] for s in sides}
            for _ in range(args.steps):
                for s in sides:
                    c0, t0 = time.process_time(), time.perf_counter()
                    s.step()
                    times[s.name].append(time.perf_counter() - t0)
                    cpu[s.name].append(time.process_time() - c0)
            print(f"prompt {P}: median per decode step over {args.steps} steps (wall under load: direction only; "
                  "process CPU time: all threads)")
            base, base_cpu = median(times[sides[0].name]), median(cpu[sides[0].name])
            for s in sides:
                m, c = median(times[s.name]), median(cpu[s.name])
                print(f"  {s.name:24s} wall {1e3 * m:7.2f} ms {base / m:5.2f}x   CPU {1e3 * c:7.2f} ms {base_cpu / c:5.2f}x "
                      f"{sides[0].name}")
            for s in sides:
                if args.profile:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                        for _ in range(2):
                            s.step()
                    print(f"--- torch.profiler {s.name} prompt {P} (2 steps)")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
                if args.cprofile:
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(4):
                        s.step()
                    pr.disable()
                    buf = io.StringIO()
                    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(args.rows)
                    print(f"--- cProfile {s.name} prompt {P} (4 steps)")
                    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
