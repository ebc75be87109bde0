"""Held-out perplexity of recipes with a tuning study's window settings (the winner's comparison points), with intervals.

Usage:
    PYTHONPATH=. python bench/tune_heldout_ppl.py --study bench/results/tune/smollm2-duo-snapkv-25 \
        --windows 8 --window 1153 --prefix 1024 --name heldout_ppl_L1024 \
        --recipe "duo(retrieval=0.3, sinks=4, window=52) + snapkv(budget=512)" --recipe "snapkv(budget=256)"

Reads the study's ``result.json`` (its model is the CLI's ``--model``, default smollm2-135m) for the
perplexity windows (``windows``, ``window``, ``prefix``; ``--windows``/``--window``/``--prefix`` override
them), scores dense and each recipe on the held-out split (``tuning.objectives.Evaluator(split="heldout")``:
the last ~40% of the novel, streamed: prefill ``prefix`` tokens, then one decode step per scored token) and
writes ``<name>.json`` and ``<name>.md`` next to it, rewritten after every recipe (a stopped run keeps what it
measured): per recipe the KV fraction held, the perplexity with its 95% interval (windows resampled,
``eval.stats.perplexity_interval``) and the perplexity ratio to dense paired over the same windows
(``eval.stats.paired_ppl_ratio``), and, against the first recipe given (``--recipe``, the tuned one), the paired
ratio of each other recipe. Needles are not scored here (the long suite's needle cases are the held-out needle
test: ``bench/long_headline.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _row(recipe, m, base_nll, first_nll):
    from graphwright.eval.stats import paired_ppl_ratio, perplexity_interval

    nll = m["nll_per_window"]
    row = {"recipe": recipe, "kv_fraction": m["kv_fraction"], "kv_bytes": m["kv_bytes"], "ppl": m["ppl"], "ppl_ratio": m["ppl_ratio"],
           "nll_per_window": nll, "ppl_interval": perplexity_interval(nll), "vs_dense": paired_ppl_ratio(base_nll, nll)}
    if first_nll is not None:
        row["vs_first"] = paired_ppl_ratio(first_nll, nll)  # this recipe's ppl / the first recipe's, minus 1
    return row


def _markdown(rows, sizes) -> str:
    lines = [f"Held-out perplexity ({sizes['windows']} windows of {sizes['window']} tokens, prefill {sizes['prefix']}, "
             f"{sizes['window'] - sizes['prefix'] - 1} decode-step tokens scored per window; 95% bootstrap intervals over windows)", "",
             "| recipe | KV fraction | KV MiB | perplexity [95% CI] | vs dense, paired | vs the first recipe, paired |", "|---|---|---|---|---|---|"]
    for r in rows:
        pi, vd, vf = r["ppl_interval"], r["vs_dense"], r.get("vs_first")
        first = "-" if vf is None else f"{vf['ratio_minus_1']:+.2%} [{vf['lo']:+.2%}, {vf['hi']:+.2%}]"
        lines.append(f"| `{r['recipe']}` | {r['kv_fraction']:.3f} | {r['kv_bytes'] / 2**20:.2f} | {pi['ppl']:.3f} [{pi['lo']:.3f}, {pi['hi']:.3f}] "
                     f"| {vd['ratio_minus_1']:+.2%} [{vd['lo']:+.2%}, {vd['hi']:+.2%}] | {first} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="a graphwright tune --out folder holding result.json")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", action="append", required=True, help="repeatable; the first is compared with every other, paired")
    p.add_argument("--windows", type=int, default=None, help="override the study's window count")
    p.add_argument("--window", type=int, default=None, help="override the study's window length (scored tokens = window - prefix - 1)")
    p.add_argument("--prefix", type=int, default=None, help="override the study's prefill length (the prompt the cache policy sees)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--name", default="heldout_ppl", help="output file stem in --study")
    args = p.parse_args(argv)
    import torch

    from graphwright.models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from graphwright.tuning.objectives import Evaluator

    settings = json.loads((Path(args.study) / "result.json").read_text())["settings"]
    sizes = {k: settings["eval"][k] for k in ("windows", "window", "prefix")}
    sizes.update({k: getattr(args, k) for k in ("windows", "window", "prefix") if getattr(args, k) is not None})
    model, tok = load_model(args.model)
    ev = Evaluator(model, tok, split="heldout", backend=settings["backend"], seed=settings["seed"], **sizes)
    base = ev.evaluate(None)
    dense = {**base, "kv_fraction": 1.0, "ppl_ratio": 1.0}
    rows = [_row("dense", dense, base["nll_per_window"], None)]
    out = Path(args.study) / f"{args.name}.json"
    first_nll = None
    for recipe in args.recipe:
        m = ev.evaluate(recipe, base=base)
        rows.append(_row(recipe, m, base["nll_per_window"], first_nll))
        first_nll = first_nll if first_nll is not None else m["nll_per_window"]
        print(f"{recipe}: KV fraction {m['kv_fraction']:.3f}, held-out ppl {m['ppl']:.3f} (ratio {m['ppl_ratio']:.4f})", flush=True)
        out.write_text(json.dumps({"sizes": sizes, "split": "heldout", "model": args.model, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(_markdown(rows, sizes))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
