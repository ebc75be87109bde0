"""The tuned recipe against hand-written ones on held-out RULER-style tasks, paired, resumable (issue 21 item 5).

Usage:
    PYTHONPATH=. nice -n 10 python bench/tune_heldout_ruler.py --length 1024 --cases 40 \
        --tasks niah_multikey_1 niah_multikey_2 vt \
        --recipe "snapkv(budget=256)" --recipe "duo(retrieval=0.3, sinks=4, window=52) + snapkv(budget=512)"
    PYTHONPATH=. python bench/tune_heldout_ruler.py ... --table-only     # rebuild the table from the journal

Runs the suite's RULER-style tasks (``graphwright.eval.ruler``, seed 0 cases, so every recipe answers the same
prompts) for dense and each ``--recipe`` one case at a time: case i of every task for dense and each recipe (each
compiled once), then case i + 1, so a run stopped early holds the same cases for every recipe. Cases of a smaller
``--cases`` are the first cases of a larger one (each task's generator is seeded once per task and length and
draws cases in order). Every finished case is appended at once to the JSONL journal under the keys
``graphwright.eval.suite.run_suite`` uses (``graphwright.eval.journal``): a rerun runs only what is missing. The
tables come from ``run_suite(run_missing=False)`` on the journal: ``suite.md``/``suite.json``/``suite.png`` under
``--out``, and ``table.md``/``table.json``: per task and the headline (tasks where dense is above chance), only
the cases every recipe holds, each recipe's mean score with its 95% bootstrap interval and the paired differences
to dense and to ``--vs`` (default: the tuned recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TUNED = "duo(retrieval=0.3, sinks=4, window=52) + snapkv(budget=512)"
DEFAULT_OUT = HERE / "results" / "tune" / "heldout-ruler-L1024"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--cases", type=int, default=20, help="cases per task (the first N of the seeded generator)")
    p.add_argument("--tasks", nargs="+", default=["niah_multikey_1", "niah_multikey_2", "vt"])
    p.add_argument("--recipe", action="append", default=[], help="recipes besides dense (repeatable; default: snapkv(budget=256), the tuned one)")
    p.add_argument("--vs", default=TUNED, help="the recipe every other one is also paired with in table.md")
    p.add_argument("--vs-name", default="tuned", help="what table.md calls the --vs recipe (its row and the 'vs NAME' differences)")
    p.add_argument("--journal", default=None, help="default OUT/cases.jsonl")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def paired_table(result: dict, vs: str, vs_name: str = "tuned") -> tuple:
    """Markdown lines and rows: per recipe and task (and all headline tasks pooled), mean score, paired diff to dense and to ``vs``.

    Each column (a task, or the headline tasks pooled) is paired on its own cases: those held by every recipe that
    holds some case of each of the column's tasks; a recipe that ran none of a column's tasks shows ``-`` there
    (so recipes run only on the headline tasks leave the others' dense rows whole). KV fraction: the recipe's KV
    bytes over dense's on every case both hold."""
    from graphwright.eval.stats import bootstrap_mean, paired_difference

    raw = result["raw"]
    tasks = sorted({r["task"] for r in raw["dense"].get("ruler", [])})
    headline = result.get("ruler_headline_tasks") or []
    groups = [(t, [t]) for t in tasks] + [("headline", headline)]
    labels = list(raw)
    by = {lab: {r["id"]: r for r in raw[lab].get("ruler", [])} for lab in labels}
    task_of = {c: r["task"] for c, r in by["dense"].items()}
    members, commons = {}, {}
    for g, ts in groups:
        members[g] = [lab for lab in labels if ts and all(any(task_of.get(c) == t for c in by[lab]) for t in ts)]
        held = [{c for c in by[lab] if task_of.get(c) in ts} for lab in members[g]]
        commons[g] = sorted(set.intersection(*held)) if held else []
    lines = ["| recipe | KV fraction | " + " | ".join(f"{g} (n)" for g, _ in groups) + " |", "|---|---|" + "---|" * len(groups)]
    rows = []
    for lab in labels:
        both = [c for c in by[lab] if c in by["dense"]]
        kv = sum(by[lab][c]["kv_bytes"] for c in both) / max(1, sum(by["dense"][c]["kv_bytes"] for c in both))
        cells, row = [], {"recipe": lab, "kv_fraction": kv, "groups": {}}
        for g, _ in groups:
            ids = commons[g]
            if lab not in members[g] or not ids:
                cells.append("-")
                continue
            s = [by[lab][c]["score"] for c in ids]
            m = bootstrap_mean(s)
            cell = {"n": len(ids), "score": m}
            txt = f"{m['mean']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"
            if lab != "dense":
                d = paired_difference([by["dense"][c]["score"] for c in ids], s)
                cell["vs_dense"] = d
                txt += f"; vs dense {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
            if lab != vs and vs in members[g]:
                d = paired_difference([by[vs][c]["score"] for c in ids], s)
                cell["vs_tuned"] = d
                txt += f"; vs {vs_name} {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
            cells.append(f"{txt} ({len(ids)})")
            row["groups"][g] = cell
        rows.append(row)
        name = f"**{vs_name}: `{lab}`**" if lab == vs else f"`{lab}`"
        lines.append(f"| {name} | {kv:.3f} | " + " | ".join(cells) + " |")
    return lines, rows, len(set().union(*commons.values())) if commons else 0


def run_rounds(model, tok, recipes, args, jr, t0) -> None:
    """Compile each recipe once, then run case by case: case i of every task for dense and each recipe, then case i + 1.

    Rows the journal holds are skipped (same keys as ``eval.suite.run_suite``, so its tables read them).
    """
    from graphwright.eval.suite import DENSE, build_cases, canonical, case_jobs, run_case_major

    cases = build_cases(tok, ("ruler",), (), args.cases, tuple(args.tasks), (args.length,), seed=0)
    jobs = case_jobs(tok, cases, 2048, 16, "torch")
    labels = [DENSE] + [canonical(r) for r in recipes]
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i][1]["id"].rsplit("-c", 1)[1].zfill(6), i))  # case index first

    def log(job, label, row, seconds):
        print(f"{job[1]['id']} {label}: score {row['score']:.2f} in {seconds:.0f} s "
              f"({time.perf_counter() - t0:.0f} s total)", file=sys.stderr, flush=True)

    run_case_major(model, tok, labels, jobs, order, jr, args.model, 2048, 16, log=log)

def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from graphwright.eval.bytetok import ByteTokenizer
    from graphwright.eval.journal import Journal
    from graphwright.eval.suite import canonical, run_suite
    from graphwright.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cases < 1:
        raise SystemExit(f"--cases must be >= 1; got {args.cases}")
    recipes = args.recipe or ["snapkv(budget=256)", TUNED]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    tok = tok if tok is not None else ByteTokenizer()
    jr = Journal(args.journal or out / "cases.jsonl")
    kw = dict(tasks=("ruler",), lengths=(), ruler_tasks=tuple(args.tasks), ruler_lengths=(args.length,), journal=jr,
              model_name=args.model, progress=False, seed=0)
    t0 = time.perf_counter()
    if not args.table_only:
        run_rounds(model, tok, recipes, args, jr, t0)
    res = run_suite(model, tok, recipes, cases=args.cases, out=out, run_missing=False, **kw)
    lines, rows, n_common = paired_table(res, canonical(args.vs), args.vs_name)
    note = (f"\nRULER-style tasks at {args.length} tokens (prompt + answer), seed 0, {n_common} cases in all; each column is "
            "paired on the cases every recipe shown in it holds ('-': the recipe ran none of that column's task). Score: "
            "RULER's string_match_all; [95% bootstrap CI]; 'vs' = paired difference of means with its 95% interval. "
            "'headline' pools the tasks where dense is above chance "
            f"({', '.join(res.get('ruler_headline_tasks') or []) or 'none'}); left out of it (dense not above chance): "
            f"{', '.join(res.get('ruler_excluded_tasks') or []) or 'none'}. KV fraction: mean KV bytes held after the "
            "answer / dense's, on every case both hold.\n")
    (out / "table.md").write_text("\n".join(lines) + "\n" + note)
    (out / "table.json").write_text(json.dumps({"length": args.length, "tasks": args.tasks, "n_common": n_common, "rows": rows,
                                                 "ruler_chance": res.get("ruler_chance")}, indent=2, default=str))
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
