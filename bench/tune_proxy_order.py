"""Proxy ordering: does a study's calibration proxy rank recipes as the held-out needle suite does?

Usage:
    PYTHONPATH=. python bench/tune_proxy_order.py bench/results/tune/smollm2-snapkv-scores-25 \
        --journal bench/results/suite/cases.jsonl --length 1024 --cases 50 \
        --recipe 'snapkv(budget=256)' --recipe 'snapkv(budget=256, heads="scores", gamma=0.5)'

The proxy of a recipe is what the study measured on the calibration split (its settings: calibration
needles drawn with seed ``tune-calibration-<seed>``, streamed perplexity windows), read from the study's
journal for its completed trials; ``--recipe R`` scores more recipes the same way (one ``Evaluator`` built from
the study's settings, the study's stored dense scores as the base), cached one recipe at a time in
``DIR/proxy_extra.json`` so a stopped run resumes. The held-out score is needle accuracy on the long suite's
cases (``--journal``, the first ``--cases`` cases at ``--length``; a recipe counts only with all of them).
Three proxy scores are correlated with held-out accuracy (``graphwright.tuning.proxy_order``): calibration
needle accuracy, the calibration perplexity ratio (lower = better) and the tuner's needle order (needles, then
perplexity ratio: what ``--winner niah`` reads). Writes ``DIR/proxy_order.json`` and ``DIR/proxy_order.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def heldout_accuracy(journal: str, length: int, cases: int, model: str = "smollm2-135m") -> dict:
    """{canonical recipe: needle accuracy} over the first ``cases`` suite cases at ``length`` (recipes holding all of them)."""
    from graphwright.eval.journal import Journal

    want = {f"L{length}-c{i}" for i in range(cases)}
    rows: dict = {}
    for k, row in Journal(journal).records():
        if k["length"] == length and k["model"] == model and k["task"] == "niah" and k["case"] in want:
            rows.setdefault(k["recipe"], {})[k["case"]] = bool(row["correct"])
    return {r: sum(v.values()) / cases for r, v in rows.items() if set(v) == want}


def _fmt(v) -> str:
    return "undefined (a constant side)" if v is None else f"{v:+.2f}"


def main(argv=None) -> int:
    import optuna

    from graphwright.recipes import Recipe
    from graphwright.tuning.proxy_order import proxy_order
    from graphwright.tuning.study import JOURNAL, STUDY_NAME, open_storage, trial_rows

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", help="the study's folder (holds study.journal)")
    p.add_argument("--journal", default="bench/results/suite/cases.jsonl", help="suite journal with the held-out cases")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--recipe", action="append", default=[], help="another recipe to score on the study's calibration proxy")
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args(argv)
    out = Path(args.study)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(str(out / JOURNAL)))
    settings, base = study.user_attrs["settings"], study.user_attrs["base"]
    proxies = {}
    for t in trial_rows(study):
        if t["state"] == "COMPLETE":
            proxies[str(Recipe.parse(t["recipe"]))] = {k: t[k] for k in ("kv_fraction", "ppl_ratio", "niah")} | {"source": f"trial {t['number']}"}
    cache_path = out / "proxy_extra.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    todo = [str(Recipe.parse(r)) for r in args.recipe if str(Recipe.parse(r)) not in cache and str(Recipe.parse(r)) not in proxies]
    if todo:
        import graphwright as gw
        from graphwright.tuning.objectives import Evaluator

        model, tok = gw.load_model(args.model)
        ev = Evaluator(model, tok, split="calibration", backend=settings["backend"], seed=settings["seed"], **settings["eval"])
        for r in todo:
            m = ev.evaluate(r, base=base)
            cache[r] = {k: m[k] for k in ("kv_fraction", "ppl_ratio", "niah", "seconds")}
            cache_path.write_text(json.dumps(cache, indent=2))
            print(f"proxy {r}: needles {m['niah']}, ppl ratio {m['ppl_ratio']:.4f}, KV {m['kv_fraction']:.3f} ({m['seconds']:.0f} s)", flush=True)
    for r in args.recipe:
        c = str(Recipe.parse(r))
        if c in cache and c not in proxies:
            proxies[c] = {k: cache[c][k] for k in ("kv_fraction", "ppl_ratio", "niah")} | {"source": "extra"}
    held = heldout_accuracy(args.journal, args.length, args.cases, args.model)
    scores = {"calibration needles": {r: v["niah"] for r, v in proxies.items()},
              "calibration perplexity (1 / ratio)": {r: 1.0 / v["ppl_ratio"] for r, v in proxies.items()},
              "tuner's needle order (needles, then perplexity)": {r: v["niah"] * 1000.0 - v["ppl_ratio"] for r, v in proxies.items()}}
    result = {"study": str(out), "held_out": {"journal": args.journal, "length": args.length, "cases": args.cases},
              "recipes": [{"recipe": r, **v, "heldout_accuracy": held.get(r)} for r, v in proxies.items()],
              "correlations": {name: proxy_order(s, held) for name, s in scores.items() if sum(r in held for r in s) >= 2}}
    (out / "proxy_order.json").write_text(json.dumps(result, indent=2))
    lines = [f"Proxy (calibration: {settings['eval']}) vs held-out needles ({args.cases} suite cases at {args.length} tokens)", "",
             "| recipe | from | KV fraction (cal.) | cal. ppl ratio | cal. needles | held-out accuracy |", "|---|---|---|---|---|---|"]
    for row in sorted(result["recipes"], key=lambda x: -(x["heldout_accuracy"] or -1)):
        acc = "-" if row["heldout_accuracy"] is None else f"{row['heldout_accuracy']:.2f}"
        lines.append(f"| `{row['recipe']}` | {row['source']} | {row['kv_fraction']:.3f} | {row['ppl_ratio']:.4f} | {row['niah']:.3f} | {acc} |")
    lines += ["", "| proxy | n | Spearman rho | Kendall tau-b |", "|---|---|---|---|"]
    for name, c in result["correlations"].items():
        lines.append(f"| {name} | {c['n']} | {_fmt(c['spearman'])} | {_fmt(c['kendall_tau_b'])} |")
    (out / "proxy_order.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
