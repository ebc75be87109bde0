"""The long suite's headline configuration (issue 18 item 1): needles at 1,024 then 2,048 tokens, resumable.

Usage:
    python bench/long_headline.py                      # run (or resume) everything, in priority order
    python bench/long_headline.py --lengths 1024 --cases 10 --out /tmp/x --journal /tmp/x/cases.jsonl
    python bench/long_headline.py --table-only         # rebuild the tables from the journal, run nothing
                                                       # (every recipe the journal holds at each length, unless --recipes)
    python bench/long_headline.py --table-only --lengths 4096 \
        --pair 'snapkv(budget={quarter}, heads="scores", gamma=0.5)' 'snapkv(budget={quarter})'   # A - B, paired

Per length L (in order) it runs ``graphwright.eval.run_suite`` on the needle task with dense and
``RECIPES`` filled for L (budgets are fractions of the prompt: 50% of 1,024 = ``snapkv(budget=512)``),
in this order: dense; snapkv 50%, 25%; snapkv(heads="adaptive") 50%, 25%; streaming 50% (4 sinks + window);
h2o 50% (heavy 25% + recent 25% of the length); then, after every length is done with those, duo(sinks=4,
window=256) with the shipped head set at each length (``DEFERRED``: its runtime is ~10x slower per case
than the others on CPU today, a 1,024-token prefill ~50 s and ~9 s per decode step on the loaded machine, so
it would hold the faster methods back by hours).
Every finished case is appended at once to the JSONL journal (default ``bench/results/suite/cases.jsonl``,
see ``graphwright.eval.journal``); a rerun skips what is done, so a killed run is resumed by starting it
again with the same arguments. The per-length tables (``suite.md`` / ``suite.json`` / ``suite.png``
under ``--out``/L{L}) are rebuilt from whatever the journal holds, n per cell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

RECIPES = ["snapkv(budget={half})", "snapkv(budget={quarter})", 'snapkv(budget={half}, heads="adaptive")',
           'snapkv(budget={quarter}, heads="adaptive")', "streaming(sinks=4, window={half_w})", "h2o(heavy=0.25, recent=0.25)",
           "duo(sinks=4, window=256)"]
DEFERRED = ("duo",)  # passes whose recipes run after all lengths are done with the others


def recipes_for(length: int, templates=RECIPES) -> list:
    """The recipe templates filled for one prompt length (``{half}``, ``{quarter}``: tokens; ``{half_w}`` = half - 4 sinks)."""
    half, quarter = round(length * 0.5), round(length * 0.25)
    return [t.format(half=half, quarter=quarter, half_w=half - 4) for t in templates]


def journal_recipes(jr, length: int, model: str) -> list:
    """Every recipe (canonical string, first-seen order, dense left out) the journal holds for ``model`` at ``length``."""
    seen = dict.fromkeys(k["recipe"] for k, _ in jr.records() if k["length"] == length and k["model"] == model)
    seen.pop("dense", None)
    return list(seen)


def deferred(recipe: str) -> bool:
    """True for a recipe whose passes include one of ``DEFERRED``."""
    from graphwright.recipes import Recipe

    return any(name in DEFERRED for name, _ in Recipe.parse(recipe).passes)


def strided(n: int, stride: int) -> list:
    """Case indices 0..n-1 in the order 0, k, 2k, ..., then 1, 1 + k, ...: a run stopped after any whole pass holds
    cases spread evenly over the depths (the suite's case i sits at depth i / (n - 1)), not only the shallow ones."""
    return [i for r in range(stride) for i in range(r, n, stride)]


def run_strided(model, tok, recipes, length: int, args, jr) -> None:
    """Needle cases at ``length`` in ``strided`` order, each case for dense and every recipe (each compiled once).

    Keys and rows are ``eval.suite.run_suite``'s (``case_jobs``/``_run_case``), so its tables read them."""
    import time

    from graphwright.eval.suite import DENSE, build_cases, canonical, case_jobs, run_case_major

    jobs = case_jobs(tok, build_cases(tok, ("niah",), (length,), args.cases), 2048, 16, "torch")
    labels = [DENSE] + [canonical(r) for r in recipes]
    t0 = time.perf_counter()

    def log(job, label, row, seconds):
        print(f"{job[1]['id']} {label}: correct {row['correct']} in {seconds:.0f} s "
              f"({time.perf_counter() - t0:.0f} s total)", file=sys.stderr, flush=True)

    run_case_major(model, tok, labels, jobs, strided(len(jobs), args.stride), jr, args.model, 2048, 16, log=log)

def paired(jr, length: int, model: str, a: str, b: str, seed: int = 0) -> dict:
    """Recipe ``a`` minus recipe ``b`` (canonical strings) on the needle cases both hold at ``length``: accuracies and
    the paired difference with its seeded 95% bootstrap interval (``eval.stats.paired_difference``)."""
    from graphwright.eval.stats import bootstrap_mean, paired_difference

    rows: dict = {a: {}, b: {}}
    for k, r in jr.records():
        if k["length"] == length and k["model"] == model and k["task"] == "niah" and k["recipe"] in rows:
            rows[k["recipe"]][k["case"]] = float(r["correct"])
    ids = [c for c in rows[a] if c in rows[b]]
    if not ids:
        return {"a": a, "b": b, "length": length, "n": 0}
    xa, xb = [rows[a][c] for c in ids], [rows[b][c] for c in ids]
    d = paired_difference(xb, xa, seed)
    return {"a": a, "b": b, "length": length, "n": len(ids), "acc_a": bootstrap_mean(xa, seed)["mean"],
            "acc_b": bootstrap_mean(xb, seed)["mean"], "delta": d["mean"], "lo": d["lo"], "hi": d["hi"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--recipes", nargs="+", default=None,
                   help="templates: {half}, {quarter} tokens, {half_w} = half - 4 (default: RECIPES to run; "
                        "with --table-only every recipe the journal holds at that length)")
    p.add_argument("--journal", default=str(HERE / "results" / "suite" / "cases.jsonl"))
    p.add_argument("--out", default=str(HERE / "results" / "suite"), help="tables go to OUT/L{length}/")
    p.add_argument("--table-only", action="store_true", help="rebuild the tables from the journal; run no case")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="also print recipe A minus recipe B (templates) paired on the cases both hold, per length")
    p.add_argument("--stride", type=int, default=1,
                   help="> 1: run case by case in the order 0, k, 2k, ... then 1, 1 + k, ... (dense and every recipe per "
                        "case), so a partial cell is spread over the depths; 1 (default): recipe by recipe, cases in order")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from graphwright.eval.bytetok import ByteTokenizer
    from graphwright.eval.journal import Journal
    from graphwright.eval.suite import run_suite
    from graphwright.models import load_model

    args = parse_args(argv)
    model, tok = load_model(args.model)
    tok = tok if tok is not None else ByteTokenizer()
    jr = Journal(args.journal)
    failed = {}
    kw = dict(tasks=("niah",), cases=args.cases, journal=jr, model_name=args.model, progress=args.progress)
    templates = RECIPES if args.recipes is None else args.recipes
    if not args.table_only and args.stride > 1:
        for length in args.lengths:
            run_strided(model, tok, recipes_for(length, templates), length, args, jr)
    elif not args.table_only:  # one recipe at a time (dense first), so a recipe that fails does not stop the others
        plan = [(L, r) for L in args.lengths for r in ["dense"] + recipes_for(L, templates) if not deferred(r)]
        plan += [(L, r) for L in args.lengths for r in recipes_for(L, templates) if deferred(r)]
        for length, recipe in plan:
            try:
                run_suite(model, tok, [recipe], lengths=(length,), **kw)
            except Exception as exc:  # noqa: BLE001 - reported here and in the summary line, the run goes on
                failed[f"L{length} {recipe}"] = f"{type(exc).__name__}: {exc}"
                print(f"FAILED L={length} {recipe}: {failed[f'L{length} {recipe}']}", file=sys.stderr, flush=True)
            print(f"done L={length} {recipe} ({len(jr)} journal rows)", file=sys.stderr, flush=True)
    for length in args.lengths:
        table = (journal_recipes(jr, length, args.model) if args.table_only and args.recipes is None
                 else recipes_for(length, templates))
        res = run_suite(model, tok, table, lengths=(length,), out=Path(args.out) / f"L{length}",
                        run_missing=False, **kw)
        for r in res["rows"]:
            if r["metric"] == "all":
                print(f"L={length} {r['recipe']}: acc {r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] "
                      f"vs dense {r['delta']:+.3f} n={r['n']} kv={r['kv_fraction']}", file=sys.stderr, flush=True)
        for ta, tb in args.pair:
            from graphwright.eval.suite import canonical

            pr = paired(jr, length, args.model, canonical(recipes_for(length, [ta])[0]), canonical(recipes_for(length, [tb])[0]))
            print(f"L={length} {pr['a']} - {pr['b']}: " + (f"{pr['acc_a']:.2f} - {pr['acc_b']:.2f} = {pr['delta']:+.2f} "
                  f"[{pr['lo']:+.2f}, {pr['hi']:+.2f}] paired, n={pr['n']}" if pr["n"] else "no common cases"),
                  file=sys.stderr, flush=True)
    if failed:
        print(f"{len(failed)} recipe run(s) failed: {failed}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
