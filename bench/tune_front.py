"""The Pareto front of a tuning study as it stands (a run stopped early): table, plot, TOMLs and the winner, no re-measure.

Usage:
    PYTHONPATH=. python bench/tune_front.py bench/results/tune/smollm2-duo-snapkv-25

``graphwright tune`` writes these files itself when its trials are done, then re-measures the winner on
the held-out split. This writes the same ``pareto.json`` / ``pareto.md`` / ``pareto.png`` /
``recipes/trial-N.toml`` from the trials the study's journal holds now (completed ones only) and names
the winner by the study's own rule (``settings["winner"]``, ``tuning.report.pick_winner``) in
``winner_calibration.json``, without compiling or running anything: for a study stopped before its
last trial on a busy machine. The held-out measures are then separate runs (``bench/long_headline.py``
for the suite's needles, ``bench/tune_heldout_ppl.py`` for perplexity).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    import optuna

    from graphwright.recipes import Recipe
    from graphwright.tuning.report import pareto_front, pick_winner, plot_front, to_markdown, trial_counts
    from graphwright.tuning.study import JOURNAL, STUDY_NAME, open_storage, trial_rows

    out = Path((argv or sys.argv[1:])[0])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(str(out / JOURNAL)))
    settings, rows = study.user_attrs["settings"], trial_rows(study)
    niah = bool(settings["eval"]["niah_cases"])
    front = pareto_front(rows, settings["budget"], niah, "speed" in settings.get("objectives", ()), settings.get("min_speed"))
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
        best = pick_winner(front, settings.get("winner", "ppl"))
        (out / "winner_calibration.json").write_text(json.dumps({"rule": settings.get("winner", "ppl"), **best}, indent=2, default=str))
        print(f"winner (trial {best['number']}, by {settings.get('winner', 'ppl')}): {best['recipe']}")
    print((out / "pareto.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
