"""Held-out perplexity of recipes with a tuning study's window settings (the winner's comparison points).

Usage:
    PYTHONPATH=. python bench/tune_heldout_ppl.py --study bench/results/tune/smollm2-duo-snapkv-25 \
        --recipe "snapkv(budget=128)" --recipe "duo(retrieval=0.15, sinks=4, window=32)"

Reads the study's ``result.json`` (its model is the CLI's ``--model``, default smollm2-135m) for the
perplexity windows (``windows``, ``window``, ``prefix``; ``--windows``/``--window`` override them), scores dense and each recipe on the held-out
split (``tuning.objectives.Evaluator(split="heldout")``: the last ~40% of the novel, streamed: prefill
``prefix`` tokens, then one decode step per scored token) and writes ``heldout_ppl.json`` next to it:
per recipe the KV fraction held and the perplexity ratio to dense on the same windows. Needles are not
scored here (the long suite's needle cases are the held-out needle test: ``bench/long_headline.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="a graphwright tune --out folder holding result.json")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", action="append", required=True)
    p.add_argument("--windows", type=int, default=None, help="override the study's window count")
    p.add_argument("--window", type=int, default=None, help="override the study's window length (scored tokens = window - prefix)")
    args = p.parse_args(argv)
    from graphwright.models import load_model
    from graphwright.tuning.objectives import Evaluator

    settings = json.loads((Path(args.study) / "result.json").read_text())["settings"]
    sizes = {k: settings["eval"][k] for k in ("windows", "window", "prefix")}
    sizes.update({k: getattr(args, k) for k in ("windows", "window") if getattr(args, k) is not None})
    model, tok = load_model(args.model)
    ev = Evaluator(model, tok, split="heldout", backend=settings["backend"], seed=settings["seed"], **sizes)
    base = ev.base()
    rows = [{"recipe": "dense", "kv_fraction": 1.0, "ppl": base["ppl"], "ppl_ratio": 1.0}]
    for recipe in args.recipe:
        m = ev.evaluate(recipe, base=base)
        rows.append({"recipe": recipe, "kv_fraction": m["kv_fraction"], "ppl": m["ppl"], "ppl_ratio": m["ppl_ratio"]})
        print(f"{recipe}: KV fraction {m['kv_fraction']:.3f}, held-out ppl {m['ppl']:.3f} (ratio {m['ppl_ratio']:.4f})", flush=True)
    out = Path(args.study) / "heldout_ppl.json"
    out.write_text(json.dumps({"sizes": sizes, "split": "heldout", "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
