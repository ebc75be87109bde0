"""Seconds per ``export_onnx`` phase for the recipes of issue 17 item 5, from ``graphwright.json["export"]``.

Usage: python bench/export_time.py [--model smollm2-135m] [--recipe NAME_OR_RECIPE ...] [--context 1024]
       [--no-verify] [--ab N] [--swap-ab N] [--child-ab N] [--meta-ab N] [--threads-ab N] [--filter-ab N] [--out results/export_time.json]

Recipes: the names of ``bench/bench_decode.py`` (identity, lowrank80_h2o, h2o25, streaming25, snapkv25, lowrank50, duo;
budgets for a ``--context``-token prompt, default 1024: e.g. h2o25 = ``h2o(heavy=128, recent=128)``) or any
recipe text; default all seven names. Each is compiled (not timed) and exported once into a temporary folder
(with the verification probe unless ``--no-verify``); the table is the library's own record
(``export.phases`` wall seconds, ``export.cpu`` this process's CPU seconds, ``codegen/onnx/phases.py``),
recipes as columns, with the 1-minute load average before and after each export.

``--ab N``: for the recipes with in-graph slot eviction (prompt or decode step), export N times
alternating ``slot_functions.ENABLED`` off/on in this one process (the eviction traced layer
by layer vs once per function, ``codegen/onnx/slot_functions.py``) and print both columns' CPU
seconds per round. On a shared machine read CPU seconds and shares, not wall seconds; the load
average before/after is printed. The first export of the process also builds the torchlib registry
(``exporter_shortcuts.py``, once per process): compare columns after the first.

``--swap-ab N``: the same for ``decode_swap.ENABLED`` (H2O / DuoAttention: ``decode.onnx`` as ``model.onnx`` with its
slot functions swapped vs the decode graph's own export, ``codegen/onnx/decode_swap.py``), for the recipes whose
export swapped.

``--child-ab N``: the same for ``decode_process.ENABLED`` (``decode.onnx`` exported by a child process while this one
exports ``model.onnx`` vs one after the other, ``codegen/onnx/decode_process.py``), for the recipes whose export used
the child. Each row also prints this process's CPU seconds and the child's (``other_process_cpu_s``): on an idle
machine with two cores the wall time follows the larger of the two chains, not their sum.

``--meta-ab N``: the same for ``trace_meta.ENABLED`` (``torch.export`` storing each node's ``tensor_meta`` vs not,
``codegen/onnx/trace_meta.py``; same bytes either way), for every recipe: compare the ``torch_export`` rows.

``--threads-ab N``: the same for ``reference_threads.ENABLED`` (the verification's torch reference with torch's
default threads vs one intra-op thread per small step, ``codegen/onnx/reference_threads.py``), for every recipe:
compare the ``verify_probe`` / ``verify_reference`` rows (needs verification on).

``--filter-ab N``: the same for ``rule_filter.ENABLED`` (onnxscript's rewrite rules tried on every node vs only on
nodes of their root op type, ``codegen/onnx/rule_filter.py``; same bytes either way), for every recipe, with
``decode_process`` off so that a second graph's optimizer runs in this process under the same switch: compare the
``onnx_optimize`` / ``decode_onnx_optimize`` rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import graphwright as gw
from graphwright.bench.load import MachineLoad
from graphwright.codegen.onnx import decode_process, decode_swap, reference_threads, rule_filter, slot_functions, trace_meta
from graphwright.codegen.onnx.phases import timings_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import DEFAULT_RECIPES as RECIPES  # noqa: E402 - the speed table's recipe names
from bench_decode import RECIPES as NAMED  # noqa: E402
from bench_decode import recipe_text  # noqa: E402


def table(rows: dict, key: str, total: str) -> str:
    """Phases as rows, runs as columns: seconds and share of that run's total."""
    phases = []
    for r in rows.values():
        phases += [p for p in r[key] if p not in phases]
    width = max(14, *(len(n) for n in rows))
    head = f"phase ({'wall' if key == 'phases' else 'CPU'} s)".ljust(22) + "".join(n.rjust(width + 2) for n in rows)
    lines = [head, "-" * len(head)]
    for p in phases:
        cells = []
        for r in rows.values():
            s = r[key].get(p)
            cells.append(("-" if s is None else f"{s:7.2f} {100 * s / max(r[total], 1e-9):3.0f}%").rjust(width + 2))
        lines.append(p.ljust(22) + "".join(cells))
    lines.append("-" * len(head))
    lines.append("total".ljust(22) + "".join(f"{r[total]:7.2f}     ".rjust(width + 2) for r in rows.values()))
    return "\n".join(lines)


# the export_once argument each --*-ab switch sets
AB_ARGS = {"slot_functions": "enabled", "decode_swap": "swap", "decode_process": "child", "trace_meta": "meta",
           "reference_threads": "threads", "rule_filter": "rfilter"}


def export_once(cm, folder: Path, verify: bool, enabled: bool = True, swap: bool = True, child=None,
                meta: bool = True, threads: bool = True, rfilter: bool = True) -> dict:
    """One export; its phase record plus the machine's state meanwhile (``MachineLoad``: the CPU share other
    processes used, so a reader knows whether the wall seconds mean anything). ``child``: ``decode_process.ENABLED``
    for this export (None: its default)."""
    default = decode_process.ENABLED
    slot_functions.ENABLED, decode_swap.ENABLED, trace_meta.ENABLED = enabled, swap, meta
    reference_threads.ENABLED, rule_filter.ENABLED = threads, rfilter
    decode_process.ENABLED = default if child is None else child
    try:
        with MachineLoad() as load:
            gw.export_onnx(cm, folder, verify=verify, overwrite=True)
    finally:
        slot_functions.ENABLED = decode_swap.ENABLED = trace_meta.ENABLED = reference_threads.ENABLED = True
        rule_filter.ENABLED = True
        decode_process.ENABLED = default
    meta = json.loads((folder / "graphwright.json").read_text())
    return {**meta["export"], "graphs": sorted(p.name for p in folder.glob("*.onnx")), "machine": load.as_dict(),
            "max_abs_logit_diff": (meta.get("verification") or {}).get("max_abs_logit_diff")}


def _split_cpu(rec: dict) -> str:
    """`` (this process X + child Y)`` when a child process exported ``decode.onnx`` (``decode_process.py``)."""
    other = rec.get("other_process_cpu_s")
    return f" (this process {rec['total_cpu_s'] - other:.1f} + child {other:.1f})" if other else ""


def _ab_name(r: dict) -> str:
    return ("slots" if "slot_functions" in r else "swap" if "decode_swap" in r else "child" if "decode_process" in r
            else "no-tensor_meta" if "trace_meta" in r else "ref-1-thread" if "reference_threads" in r else "rule-filter")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", action="append", default=None, help=f"name or recipe text, repeatable; default: {RECIPES}")
    p.add_argument("--context", type=int, default=1024, help="prompt length the named recipes' budgets are for")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--ab", type=int, default=0, help="rounds of slot_functions off/on for the slot recipes")
    p.add_argument("--swap-ab", type=int, default=0, help="rounds of decode_swap off/on for the recipes it applies to")
    p.add_argument("--child-ab", type=int, default=0, help="rounds of decode_process off/on for the recipes it applies to")
    p.add_argument("--meta-ab", type=int, default=0, help="rounds of trace_meta off/on, every recipe")
    p.add_argument("--threads-ab", type=int, default=0, help="rounds of reference_threads off/on, every recipe")
    p.add_argument("--filter-ab", type=int, default=0, help="rounds of rule_filter off/on, every recipe (no child)")
    p.add_argument("--out", default="results/export_time.json")
    args = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    print(f"load average before: {load0:.2f} on {os.cpu_count()} cores", flush=True)
    model, tok = gw.load_model(args.model)
    rows, ab = {}, {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(load1=None):  # after every export: a run cut short keeps what it measured
        out.write_text(json.dumps({"model": args.model, "context": args.context, "cores": os.cpu_count(), "load_before": load0,
                                   "load_after": load1, "rows": rows, "ab": ab}, indent=2))

    with tempfile.TemporaryDirectory(prefix="gw-export-time-") as tmp:
        for i, recipe in enumerate(args.recipe or RECIPES):
            text = recipe_text(recipe, args.context) if recipe in NAMED else recipe
            cm = gw.compile(model, recipe=text, tokenizer=tok, verify=False)
            folder = Path(tmp) / f"r{i}"
            t0, l0 = time.perf_counter(), os.getloadavg()[0]
            rows[recipe] = {"recipe": text or "identity", "load_before": l0, **export_once(cm, folder, not args.no_verify)}
            rows[recipe]["load_after"] = os.getloadavg()[0]
            print(f"{recipe} = {text or 'identity'}: {time.perf_counter() - t0:.1f} s wall, {rows[recipe]['total_cpu_s']:.1f} "
                  f"CPU s{_split_cpu(rows[recipe])}, load {l0:.1f} -> {rows[recipe]['load_after']:.1f} (other processes "
                  f"{100 * rows[recipe]['machine']['foreign_share']:.0f}% of the machine), {'+'.join(rows[recipe]['graphs'])}, "
                  f"verified max |dlogit| {rows[recipe]['max_abs_logit_diff']}", flush=True)
            print(timings_table(rows[recipe]), flush=True)  # each recipe's phases at once (a loaded machine is slow)
            save()
            ab_rounds = {"slot_functions": args.ab if {"stitch", "decode_stitch"} & set(rows[recipe]["phases"]) else 0,
                    "decode_swap": args.swap_ab if "decode_swap" in rows[recipe]["phases"] else 0,
                    "decode_process": args.child_ab if "decode.onnx exported by a child"
                    in str(rows[recipe]["notes"].get("decode_process")) else 0, "trace_meta": args.meta_ab,
                    "reference_threads": args.threads_ab, "rule_filter": args.filter_ab}
            for switch, rounds in ab_rounds.items():  # each A/B: the switch off then on, ``rounds`` times, in this process
                for r in range(rounds):
                    for on in (False, True):
                        extra = {"child": False} if switch == "rule_filter" else {}  # the child keeps its own default
                        rec = export_once(cm, folder, not args.no_verify, **{AB_ARGS[switch]: on}, **extra)
                        ab.setdefault(recipe, []).append({switch: on, "round": r, **rec})
                        print(f"  A/B round {r} {switch}={'on' if on else 'off'}: {rec['total_cpu_s']:.1f} CPU s"
                              f"{_split_cpu(rec) if switch == 'decode_process' else ''} ({rec['total_s']:.1f} s wall)", flush=True)
                        save()
    print()
    print(table(rows, "phases", "total_s"))
    print()
    print(table(rows, "cpu", "total_cpu_s"))
    for recipe, runs in ab.items():
        print()
        print(f"A/B {recipe} (CPU s):")
        print(table({f"{_ab_name(r)} {'on' if next(r[k] for k in AB_ARGS if k in r) else 'off'}"
                     f"#{r['round']}": r for r in runs}, "cpu", "total_cpu_s"))
    load1 = os.getloadavg()[0]
    print(f"\nload average before {load0:.2f}, after {load1:.2f} on {os.cpu_count()} cores"
          + ("  (machine busy: compare CPU seconds and shares, not wall seconds)" if max(load0, load1) > (os.cpu_count() or 1) else ""))
    save(load1)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
