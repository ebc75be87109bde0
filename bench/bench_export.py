"""Where ``graphwright.export_onnx`` spends its time: per-phase seconds for several recipes.

Usage: python bench/bench_export.py [--model smollm2-135m] [--recipe identity --recipe ...]
       [--profile /tmp/export.prof] [--out results/bench_export.json]

Default recipes: identity, ``lowrank_kv(keep=0.5)``, ``h2o(heavy=0.25, recent=0.25)`` and the demo
recipe. Each is compiled (not timed as export) and exported once with verification; the phases
come from ``graphwright.json`` (``export.phases``, recorded by ``export_onnx`` itself), so the
numbers are the library's own, not a re-implementation. ``--profile`` runs cProfile around the
exports and prints the top functions by cumulative time.

The machine is shared: the load average (``os.getloadavg()``) is printed before and after and a
warning is printed when it exceeds the core count. Wall seconds then vary run to run; read the
per-phase shares, the CPU-seconds table (this process's CPU time, much less load-dependent) and
cProfile rather than the wall totals.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import graphwright as gw
from graphwright.cli.cmd_demo import DEMO_RECIPE

RECIPES = ["identity", "lowrank_kv(keep=0.5)", "h2o(heavy=0.25, recent=0.25)", DEMO_RECIPE]


def load_note(label: str) -> tuple[float, str]:
    """1-minute load average and a warning line when it exceeds the number of cores."""
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    note = f"load average {label}: {load1:.2f} on {cores} cores"
    if load1 > cores:
        note += f"  WARNING: machine busy (load > {cores}); absolute seconds are inflated, compare shares"
    return load1, note


def table(rows: dict, key: str = "phases", total: str = "total_s") -> str:
    """Phases as rows, recipes as columns: seconds and share of the export total (``key``:
    ``phases`` for wall-clock, ``cpu`` for this process's CPU seconds)."""
    phases = []
    for r in rows.values():
        phases += [p for p in r[key] if p not in phases]
    names = list(rows)
    width = max(16, *(len(n) for n in names))
    head = f"phase ({'wall' if key == 'phases' else 'CPU'})".ljust(18) + "".join(n[:width].rjust(width + 2) for n in names)
    lines = [head, "-" * len(head)]
    for p in phases:
        cells = []
        for n in names:
            s = rows[n][key].get(p)
            cells.append(("-" if s is None else f"{s:7.2f} s {100 * s / max(rows[n][total], 1e-9):4.0f}%").rjust(width + 2))
        lines.append(p.ljust(18) + "".join(cells))
    lines.append("-" * len(head))
    lines.append("total".ljust(18) + "".join(f"{rows[n][total]:7.2f} s      ".rjust(width + 2) for n in names))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", action="append", default=None, help=f"repeatable; default: {RECIPES}")
    p.add_argument("--no-verify", action="store_true", help="export without the ONNX Runtime verification probe")
    p.add_argument("--profile", default=None, help="write a cProfile of the exports here and print the top 30")
    p.add_argument("--out", default="results/bench_export.json")
    args = p.parse_args(argv)
    recipes = args.recipe or RECIPES

    load_before, note = load_note("before")
    print(note, flush=True)
    model, tok = gw.load_model(args.model)
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    rows, tmp = {}, tempfile.TemporaryDirectory(prefix="gw-export-")
    for i, recipe in enumerate(recipes):
        t0 = time.perf_counter()
        cm = gw.compile(model, recipe=None if recipe == "identity" else recipe, tokenizer=tok)
        compile_s = time.perf_counter() - t0
        out = Path(tmp.name) / f"r{i}"
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        gw.export_onnx(cm, out, verify=not args.no_verify)
        if prof:
            prof.disable()
        wall = time.perf_counter() - t0
        meta = json.loads((out / "graphwright.json").read_text())
        rows[recipe] = {**meta["export"], "wall_s": round(wall, 2), "compile_s": round(compile_s, 2),
                        "load_avg": round(os.getloadavg()[0], 2),
                        "verification": (meta.get("verification") or {}).get("max_abs_logit_diff")}
        print(f"{recipe}: export {wall:.1f} s (compile {compile_s:.1f} s, load {rows[recipe]['load_avg']:.2f}), "
              f"verified max |dlogit| {rows[recipe]['verification']}", flush=True)
    load_after, note_after = load_note("after")
    print()
    print(table(rows))
    print()
    print(table(rows, "cpu", "total_cpu_s"))
    print(note)
    print(note_after)
    if prof:
        import pstats

        prof.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(30)
    result = {"model": args.model, "recipes": recipes, "load_before": load_before, "load_after": load_after,
              "cores": os.cpu_count(), "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
