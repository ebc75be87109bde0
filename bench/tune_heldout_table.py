"""One held-out table for a tuned recipe against hand-written ones: the suite's needles and the held-out perplexity.

Usage:
    PYTHONPATH=. python bench/tune_heldout_table.py --length 1024 \
        --ppl bench/results/tune/smollm2-duo-snapkv-25/heldout_ppl_L1024.json \
        --tuned "duo(retrieval=0.3, sinks=4, window=52) + snapkv(budget=512)" \
        --recipe "snapkv(budget=256)" --recipe 'h2o(heads="adaptive", heavy=0.125, recent=0.125)' \
        --recipe "duo(retrieval=0.25, sinks=4, window=256)" --out bench/results/tune/heldout-L1024/table.md

Reads, runs nothing: needle cases from the suite's journal (``bench/results/suite/cases.jsonl``, the needle task at
``--length``, seed 0; only cases every listed recipe and dense hold, so every comparison is paired on the same
cases) and ``bench/tune_heldout_ppl.py``'s JSON. Per recipe: KV fraction held on the needle prompts (mean KV bytes
over dense's), needle accuracy with its 95% bootstrap interval, the paired difference to dense and to the tuned
recipe, and the held-out perplexity (interval over windows), paired ratios to dense and to the tuned recipe
(``graphwright.eval.stats``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def needle_cases(journal: Path, length: int, recipes: list) -> dict:
    """``{recipe: {case: (correct, kv_bytes)}}`` for the needle task at ``length`` (seed 0, model smollm2-135m)."""
    rows: dict = {r: {} for r in recipes}
    for line in journal.read_text().splitlines():
        e = json.loads(line)
        k = e["key"]
        if k["task"] == "niah" and k["length"] == length and k["seed"] == 0 and k["recipe"] in rows:
            rows[k["recipe"]][k["case"]] = (float(bool(e["row"]["correct"])), e["row"]["kv_bytes"])
    return rows


def _fmt_int(d, pct=False):
    if pct:
        return f"{d['ratio_minus_1']:+.1%} [{d['lo']:+.1%}, {d['hi']:+.1%}]"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--journal", default=str(HERE / "results" / "suite" / "cases.jsonl"))
    p.add_argument("--ppl", action="append", default=[],
                   help="bench/tune_heldout_ppl.py's JSON (repeatable: runs with the same sizes; the first file's row of a recipe wins)")
    p.add_argument("--tuned", required=True)
    p.add_argument("--recipe", action="append", default=[])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from graphwright.eval.stats import bootstrap_mean, paired_difference, paired_ppl_ratio, perplexity_interval

    names = ["dense", args.tuned, *args.recipe]
    cases = needle_cases(Path(args.journal), args.length, names)
    common = sorted(set.intersection(*(set(c) for c in cases.values())))
    runs = [json.loads(Path(f).read_text()) for f in args.ppl]
    sizes = runs[0]["sizes"] if runs else None
    if any(r["sizes"] != sizes for r in runs):
        raise SystemExit(f"--ppl files measured different windows: {[r['sizes'] for r in runs]}")
    ppl: dict = {}
    for run in runs:
        for r in run["rows"]:
            ppl.setdefault(r["recipe"], r)
    acc = {r: [cases[r][c][0] for c in common] for r in names}
    kvb = {r: sum(cases[r][c][1] for c in common) / len(common) for r in names}
    lines = [f"| recipe ({args.length}-token prompts) | KV fraction (needles) | needle accuracy [95% CI] | vs dense, paired | "
             f"vs tuned, paired | held-out perplexity [95% CI] | vs dense, paired | vs tuned, paired |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in names:
        a = bootstrap_mean(acc[r])
        pr = ppl.get(r)
        row = {"recipe": r, "kv_fraction_needles": kvb[r] / kvb["dense"], "needles": a, "n_cases": len(common),
               "needles_vs_dense": paired_difference(acc["dense"], acc[r]), "needles_vs_tuned": paired_difference(acc[args.tuned], acc[r])}
        if pr is not None:
            row.update({"ppl": perplexity_interval(pr["nll_per_window"]), "ppl_kv_fraction": pr["kv_fraction"],
                        "ppl_vs_dense": paired_ppl_ratio(ppl["dense"]["nll_per_window"], pr["nll_per_window"]),
                        "ppl_vs_tuned": (paired_ppl_ratio(ppl[args.tuned]["nll_per_window"], pr["nll_per_window"])
                                         if args.tuned in ppl else None)})
        rows.append(row)
        name = f"**tuned: `{r}`**" if r == args.tuned else f"`{r}`"
        pi = row.get("ppl")
        ptxt = "not measured" if pi is None else f"{pi['ppl']:.2f} [{pi['lo']:.2f}, {pi['hi']:.2f}]"
        pvd = "-" if pi is None or r == "dense" else _fmt_int(row["ppl_vs_dense"], True)
        pvt = "-" if pi is None or r == args.tuned or row.get("ppl_vs_tuned") is None else _fmt_int(row["ppl_vs_tuned"], True)
        lines.append(f"| {name} | {row['kv_fraction_needles']:.3f} | {a['mean']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] | "
                     f"{'-' if r == 'dense' else _fmt_int(row['needles_vs_dense'])} | "
                     f"{'-' if r == args.tuned else _fmt_int(row['needles_vs_tuned'])} | {ptxt} | {pvd} | {pvt} |")
    note = f"\nNeedles: the suite's {len(common)} needle cases at {args.length} tokens (seed 0), paired. "
    note += ("Perplexity: not measured (no --ppl).\n" if sizes is None else
             f"Perplexity: held-out split, {sizes['windows']} windows of {sizes['window']} tokens, prefill {sizes['prefix']}, "
             f"{sizes['window'] - sizes['prefix'] - 1} decode-step tokens scored per window; intervals over windows; "
             "'vs' columns are ppl / ppl_other - 1.\n")
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n" + note)
    out.with_suffix(".json").write_text(json.dumps({"length": args.length, "ppl_sizes": sizes, "rows": rows}, indent=2))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
