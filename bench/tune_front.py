"""The Pareto front of a tuning study as it stands (a run stopped early): table, plot, TOMLs and the winner, no re-measure.

Usage:
    PYTHONPATH=. python bench/tune_front.py bench/results/tune/smollm2-duo-snapkv-25
    PYTHONPATH=. python bench/tune_front.py bench/results/tune/smollm2-duo-snapkv-25 --winner niah+ppl --ppl-cap 1.05
    PYTHONPATH=. python bench/tune_front.py bench/results/tune/smollm2-snapkv-scores-25 --winner niah --max-ppl-delta 0.05

``graphwright tune`` writes these files itself when its trials are done, then re-measures the winner on
the held-out split. This writes the same ``pareto.json`` / ``pareto.md`` / ``pareto.png`` /
``recipes/trial-N.toml`` from the trials the study's journal holds now (completed ones only) and names
the winner by the study's own rule (``settings["winner"]``, ``tuning.report.pick_winner``) in
``winner_calibration.json``, without compiling or running anything: for a study stopped before its
last trial on a busy machine. ``--winner RULE`` (``tuning.report.WINNER_RULES``; ``--ppl-cap`` for
``niah+ppl``) applies another rule to the same front instead, writes only ``winner_calibration_RULE.json``
(the study's own files are left as they are) and prints which trial it picks and why. ``--max-ppl-delta x``
(with ``--winner``) applies the perplexity-aware constraint of ``tune(max_ppl_delta=x)`` to a study run without
it: the front keeps the trials whose calibration perplexity ratio is <= 1 + x
(``winner_calibration_RULE_ppl-delta-X.json``). The held-out
measures are then separate runs (``bench/long_headline.py`` for the suite's needles,
``bench/tune_heldout_ppl.py`` for perplexity, ``bench/tune_heldout_ruler.py`` for the RULER-style tasks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    import optuna

    from graphwright.recipes import Recipe
    from graphwright.tuning.report import WINNER_PPL_CAP, WINNER_RULES, pareto_front, pick_winner, plot_front, to_markdown, trial_counts
    from graphwright.tuning.study import JOURNAL, STUDY_NAME, open_storage, trial_rows

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the study's folder (holds study.journal)")
    p.add_argument("--winner", choices=WINNER_RULES, default=None, help="apply this rule to the front (default: the study's own)")
    p.add_argument("--ppl-cap", type=float, default=None, help=f"with --winner niah+ppl: the perplexity-ratio cap (default {WINNER_PPL_CAP})")
    p.add_argument("--max-ppl-delta", type=float, default=None,
                   help="with --winner: keep only trials whose calibration perplexity ratio is <= 1 + this (default: the study's own)")
    args = p.parse_args(argv)
    if args.max_ppl_delta is not None and (args.winner is None or not args.max_ppl_delta >= 0):
        p.error("--max-ppl-delta takes a fraction >= 0 and needs --winner (it changes the front, so only the winner file is written)")
    out = Path(args.out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(str(out / JOURNAL)))
    settings, rows = study.user_attrs["settings"], trial_rows(study)
    niah = bool(settings["eval"]["niah_cases"])
    delta = args.max_ppl_delta if args.max_ppl_delta is not None else settings.get("max_ppl_delta")
    front = pareto_front(rows, settings["budget"], niah, "speed" in settings.get("objectives", ()), settings.get("min_speed"), delta)
    if args.winner is not None:
        if not front:
            raise SystemExit(f"the study in {out} has no feasible completed trial: no front to pick from")
        best = pick_winner(front, args.winner, args.ppl_cap)
        cap = (args.ppl_cap or WINNER_PPL_CAP) if args.winner == "niah+ppl" else None
        within = None if cap is None else [r["number"] for r in front if r["ppl_ratio"] <= cap]
        keys = ("number", "recipe", "kv_fraction", "ppl_ratio", "niah")
        pick = {"rule": args.winner, "ppl_cap": cap, "max_ppl_delta": delta, "front": [{k: r.get(k) for k in keys} for r in front],
                "front_within_cap": within, **best}
        tail = "" if args.max_ppl_delta is None else f"_ppl-delta-{args.max_ppl_delta:g}"
        path = out / f"winner_calibration_{args.winner}{tail}.json"
        path.write_text(json.dumps(pick, indent=2, default=str))
        print(f"front: {[(r['number'], round(r['kv_fraction'], 3), round(r['ppl_ratio'], 4), r.get('niah')) for r in front]}")
        print(f"winner by {args.winner}{'' if cap is None else f' (cap {cap}; within: {within})'}: trial {best['number']}, "
              f"{best['recipe']} (KV {best['kv_fraction']:.3f}, ppl ratio {best['ppl_ratio']:.4f}, needles {best.get('niah')}) -> {path}")
        return 0
    (out / "recipes").mkdir(exist_ok=True)
    for r in front:
        path = out / "recipes" / f"trial-{r['number']}.toml"
        path.write_text(Recipe.parse(r["recipe"]).to_toml())
        r["toml"] = str(path)
    (out / "pareto.json").write_text(json.dumps({"front": front, "counts": trial_counts(rows)}, indent=2, default=str))
    (out / "pareto.md").write_text(to_markdown(front, settings))
    plot_front(rows, front, out / "pareto.png")
    result = {"out": str(out), "settings": settings, "base": study.user_attrs["base"], "trials": rows}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    if front:
        rule = settings.get("winner", "ppl")
        best = pick_winner(front, rule, settings.get("winner_ppl_cap") if rule == "niah+ppl" else None)
        (out / "winner_calibration.json").write_text(json.dumps({"rule": settings.get("winner", "ppl"), **best}, indent=2, default=str))
        print(f"winner (trial {best['number']}, by {settings.get('winner', 'ppl')}): {best['recipe']}")
    print((out / "pareto.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
