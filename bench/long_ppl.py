"""The long suite's perplexity part for eviction recipes, window by window, resumable (issue 18).

Usage:
    python bench/long_ppl.py                          # run (or resume) dense + RECIPES on 4 held-out windows
    python bench/long_ppl.py --windows 8              # add windows 5-8 later (the first 4 are reused)
    python bench/long_ppl.py --table-only             # rebuild the table from the journal, run nothing
    python bench/long_ppl.py --block 0                # score by one decode step per token (the slow, original path)

The part is ``graphwright eval --suite long``'s perplexity (``eval.perplexity.long_perplexity``): consecutive
windows of ``--window`` (4,096) held-out tokens of the novel, each prefilled with ``--prefix`` (2,048) tokens, then
every later token scored by one decode step. Since session 14 the continuation is scored teacher-forced in steps of
``--block`` (512) tokens over the prefilled, compressed cache (``runtime.continuation.score_continuation``): for a
recipe that compresses the prompt once and then appends (SnapKV, uniform and head-score shares) that is the same
score as one decode step per token (tested to 1e-5 on tiny Llama; on w0 of smollm2-135m the mean NLL of dense, shares
and uniform at 25% moved by at most 2.1e-7 from the decode-step rows: ``results/suite/ppl/block_check.txt``), 5 steps
instead of 2,048 per window (~2 min instead of ~45 per window and recipe on the loaded machine); recipes that evict
during decode are refused there (``--block 0`` scores them step by step), except ``duo``, whose streaming heads are
scored with a window mask that makes the blocks exact (``runtime/duo_continuation.py``, session 26). Rows keep the decode-step keys and record
``"block"``. Budgets in the templates are fractions of the prefill
(``{quarter}`` = 512 of 2,048, ``{half}`` = 1,024), the prompt the one-shot compressors see: SnapKV (uniform and
head-score shares) compresses the prefill once and then appends every decoded token, so at the last scored token the
cache holds budget + 2,047 of 4,095 tokens (a KV fraction of 0.625 at 25%, 0.75 at 50%), and the scored tokens see a
compressed past, not a compressed present.
Compiles each recipe once and runs window k for dense and every recipe before window k + 1 (the windows of a
smaller N are the first windows of a larger one), so a run stopped early holds the same windows for every recipe.
Every finished window is appended at once to the JSONL journal (default ``bench/results/suite/ppl/cases.jsonl``,
``graphwright.eval.journal``); the table (``suite.md``/``.json``/``.png``
under ``--out``) pairs each recipe with dense on the windows both hold: perplexity with its 95% interval over windows
and the paired relative change ppl/ppl_dense - 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "suite" / "ppl"

RECIPES = ['snapkv(budget={quarter}, heads="scores", gamma=0.5)', 'snapkv(budget={half}, heads="scores", gamma=0.5)',
           "snapkv(budget={quarter})", "snapkv(budget={half})"]


def recipes_for(prefix: int, templates=RECIPES) -> list:
    """Templates filled for a prefill of ``prefix`` tokens (``{half}``, ``{quarter}``: tokens)."""
    return [t.format(half=round(prefix * 0.5), quarter=round(prefix * 0.25)) for t in templates]


def run_rounds(model, tok, recipes, args, jr) -> None:
    """Compile each label once (when it has a missing window), then window k for dense and every recipe, then k + 1.

    Keys and rows are ``eval.suite.run_suite``'s (``case_jobs``/``_run_case``), so its tables read them."""
    from graphwright.eval.suite import DENSE, build_cases, canonical, case_jobs, run_case_major

    cases = build_cases(tok, ("ppl",), (), 1, (), (), ppl_windows=args.windows, ppl_window=args.window)
    jobs = case_jobs(tok, cases, args.prefix, 16, "torch")
    labels = [DENSE] + [canonical(r) for r in recipes]
    if args.run_only:  # one process per label, for a machine with more cores than one process uses
        only = {DENSE if t == DENSE else canonical(r) for t in args.run_only for r in recipes_for(args.prefix, [t])}
        labels = [lab for lab in labels if lab in only]
    t0 = time.perf_counter()

    def log(job, label, row, seconds):
        print(f"{job[2]['case']} {label}: nll {row['nll']:.4f} kv {row['kv_bytes']} in {seconds:.0f} s "
              f"({time.perf_counter() - t0:.0f} s total)", file=sys.stderr, flush=True)

    run_case_major(model, tok, labels, jobs, range(len(jobs)), jr, args.model, args.prefix, 16, log=log,
                   ppl_block=args.block or None)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4, help="held-out windows (the first N; the suite's default is 8)")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--recipes", nargs="+", default=None, help="templates ({half}, {quarter} of --prefix); default RECIPES")
    p.add_argument("--journal", default=str(OUT / "cases.jsonl"))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--run-only", nargs="+", default=None,
                   help="run only these labels ('dense' or templates among the recipes); the table still pairs every recipe with dense")
    p.add_argument("--block", type=int, default=512,
                   help="score the continuation teacher-forced in steps of this many tokens over the prefilled cache "
                        "(exact for recipes that only append after the prompt; others are refused); 0: one decode step per token")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from graphwright.eval.bytetok import ByteTokenizer
    from graphwright.eval.journal import Journal
    from graphwright.eval.suite import run_suite
    from graphwright.models import load_model

    args = parse_args(argv)
    model, tok = load_model(args.model)
    tok = tok if tok is not None else ByteTokenizer()  # the tiny built-ins (tests)
    jr = Journal(args.journal)
    recipes = recipes_for(args.prefix, RECIPES if args.recipes is None else args.recipes)
    kw = dict(tasks=("ppl",), ppl_window=args.window, ppl_prefix=args.prefix, journal=jr, model_name=args.model,
              progress=args.progress)
    if not args.table_only:
        run_rounds(model, tok, recipes, args, jr)
    res = run_suite(model, tok, recipes, ppl_windows=args.windows, out=args.out, run_missing=False, **kw)
    for r in res["rows"]:
        print(f"{r['recipe']}: ppl {r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] vs dense {r['delta']:+.4f} "
              f"[{r.get('delta_lo')}, {r.get('delta_hi')}] n={r['n']} kv={r['kv_fraction']}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
