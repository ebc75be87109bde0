"""Where ``graphwright.export_onnx`` spends its time: wall time per recipe and per phase.

Usage: python bench/bench_export.py [--model smollm2-135m] [--recipe identity --recipe ...]
       [--no-verify] [--profile /tmp/export.prof] [--out results/bench_export.json] [--allow-busy]

Default recipes: identity, ``lowrank_kv(keep=0.5)``, ``h2o(heavy=64, recent=64)`` (token budgets:
it writes a second graph, ``decode.onnx``, with in-graph slot eviction) and ``snapkv(budget=64)``.
Each is compiled (not timed as export) and exported once into a temporary folder, with the
verification probe; the phases come from ``graphwright.json`` (``export.phases``/``export.cpu``,
recorded by ``export_onnx`` itself), so the numbers are the library's own. ``--profile`` runs
cProfile around the exports and prints the top functions by cumulative time.

The machine is shared: each export runs inside ``graphwright.bench.load.MachineLoad`` (as
``bench/bench_decode.py``), which measures the CPU time other processes used meanwhile; a recipe
whose export ran while the machine was busy is labelled BUSY and the script exits 3 (unless
``--allow-busy``): its wall seconds are not a result. The CPU-seconds table (this process's CPU
time) depends much less on the load; read it, and the shares, on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import graphwright as gw
from graphwright.bench.load import MachineLoad

RECIPES = ["identity", "lowrank_kv(keep=0.5)", "h2o(heavy=64, recent=64)", "snapkv(budget=64)"]


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
    p.add_argument("--allow-busy", action="store_true", help="exit 0 even when the machine was busy (still labelled)")
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
        cm = gw.compile(model, recipe=None if recipe == "identity" else recipe, tokenizer=tok, verify=False)  # export verifies
        compile_s = time.perf_counter() - t0
        out = Path(tmp.name) / f"r{i}"
        if prof:
            prof.enable()
        with MachineLoad() as load:
            gw.export_onnx(cm, out, verify=not args.no_verify)
        if prof:
            prof.disable()
        meta = json.loads((out / "graphwright.json").read_text())
        rows[recipe] = {**meta["export"], "wall_s": round(load.wall_s, 2), "compile_s": round(compile_s, 2),
                        "load": load.as_dict(), "graphs": [f for f in ("model.onnx", "decode.onnx") if (out / f).exists()],
                        "verification": (meta.get("verification") or {}).get("max_abs_logit_diff")}
        state = "BUSY (not a result)" if load.busy else "quiet"
        print(f"{recipe}: export {load.wall_s:.1f} s wall, {load.own_cpu_s:.1f} s CPU (compile {compile_s:.1f} s); "
              f"{'+'.join(rows[recipe]['graphs'])}; verified max |dlogit| {rows[recipe]['verification']}; "
              f"{state}: other processes used {100 * load.foreign_share:.0f}% of the machine", flush=True)
        shutil.rmtree(out, ignore_errors=True)
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
    busy = [r for r, row in rows.items() if row["load"]["busy"]]
    result = {"model": args.model, "recipes": recipes, "load_before": load_before, "load_after": load_after,
              "cores": os.cpu_count(), "busy": busy, "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"written {path}")
    if busy:
        print(f"the machine was busy during the export of {', '.join(busy)}: those wall seconds are not a result", file=sys.stderr)
        return 0 if args.allow_busy else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
