"""Outputs of a tuning study: the Pareto front (table, plot, one TOML recipe per point) and the winner.

The front is computed over completed, feasible trials (``kv_fraction <= budget``,
``speed_ratio >= min_speed`` under a speed floor, and ``ppl_ratio <= 1 + max_ppl_delta`` under a perplexity
constraint) on the study's objectives (KV fraction held and
perplexity ratio, minimised; needle accuracy and decode speed ratio, maximised, when measured).
``pareto.json`` holds ``{"front": [...], "counts": {...}}``: the front's rows and how many trials
ended in each state, with the pruned ones split by the rule that pruned them (``pruned_by``).
The winner (``settings["winner"]``, ``WINNER_RULES``) is the front's point with the lowest perplexity ratio (then
the lowest KV fraction; ``"ppl"``, the default) or with the most calibration needles found (then the lowest
perplexity ratio and KV fraction; ``"niah"``, for a study with ``niah_cases > 0``), or, so that needles are
not bought with perplexity blindly, ``"niah+ppl"``: the most calibration needles among the front's points whose
perplexity ratio is <= ``winner_ppl_cap`` (settings; default ``WINNER_PPL_CAP`` = 1.05, i.e. at most 5% above
dense), ties to the lower perplexity ratio, KV fraction, trial number; when no point is within the cap, the point
with the lowest perplexity ratio (as ``"ppl"``). The cap reads the calibration ratio, so it is only as good as
the calibration perplexity's token count;
it is compiled from its TOML file (so the file is what ``compile()`` takes) with verification,
re-measured on the held-out split against the dense model on the same windows, and its ``cm.report()`` written next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

WINNER_RULES = ("ppl", "niah", "niah+ppl")
WINNER_PPL_CAP = 1.05  # "niah+ppl": the largest calibration perplexity ratio (to dense) a needle winner may have


def check_ppl_cap(cap) -> float:
    """``cap`` as a float > 1 (a perplexity ratio to dense), or a ValueError naming what is allowed."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 1.0 or cap != cap or cap == float("inf"):
        raise ValueError(f"winner_ppl_cap must be a finite perplexity ratio > 1 (e.g. 1.05 = at most 5% above dense); got {cap!r}")
    return float(cap)


def pick_winner(front: list, rule: str = "ppl", ppl_cap: float | None = None) -> dict:
    """The winner of a non-empty front by ``rule`` (module docstring); ties go to the lower trial number.

    ``ppl_cap``: the perplexity-ratio cap of ``"niah+ppl"`` (None: ``WINNER_PPL_CAP``); the other rules take none.
    """
    if rule not in WINNER_RULES:
        raise ValueError(f"winner must be one of {list(WINNER_RULES)}; got {rule!r}")
    if not front:
        raise ValueError("pick_winner needs a non-empty Pareto front")
    if ppl_cap is not None and rule != "niah+ppl":
        raise ValueError(f"ppl_cap applies to winner='niah+ppl' only; got winner={rule!r} with ppl_cap={ppl_cap!r}")
    if rule in ("niah", "niah+ppl") and any(r.get("niah") is None for r in front):
        raise ValueError(f"winner={rule!r} needs needle accuracy on every trial (niah_cases > 0)")
    by_ppl = min(front, key=lambda r: (r["ppl_ratio"], r["kv_fraction"], r["number"]))
    if rule == "ppl":
        return by_ppl
    pool = front
    if rule == "niah+ppl":
        cap = check_ppl_cap(WINNER_PPL_CAP if ppl_cap is None else ppl_cap)
        pool = [r for r in front if r["ppl_ratio"] <= cap]
        if not pool:
            return by_ppl
    return min(pool, key=lambda r: (-r["niah"], r["ppl_ratio"], r["kv_fraction"], r["number"]))


def _keys(row, niah: bool, speed: bool = False):
    k = [row["kv_fraction"], row["ppl_ratio"]]
    return k + ([-row["niah"]] if niah else []) + ([-row["speed_ratio"]] if speed else [])


def pareto_front(rows: list, budget: float, niah: bool = False, speed: bool = False, min_speed: float | None = None,
                 max_ppl_delta: float | None = None) -> list:
    """The non-dominated completed feasible trials (``kv_fraction <= budget``, speed floor met, perplexity ratio
    <= 1 + ``max_ppl_delta``), by KV fraction."""
    ok = [r for r in rows if r["state"] == "COMPLETE" and r.get("kv_fraction") is not None and r["kv_fraction"] <= budget
          and (min_speed is None or (r.get("speed_ratio") is not None and r["speed_ratio"] >= min_speed))
          and (max_ppl_delta is None or r["ppl_ratio"] <= 1.0 + max_ppl_delta)]
    front = []
    for r in ok:
        a = _keys(r, niah, speed)
        dominated = any(all(x <= y for x, y in zip(_keys(o, niah, speed), a)) and _keys(o, niah, speed) != a for o in ok)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["kv_fraction"], r["ppl_ratio"], r["number"]))


def trial_counts(rows: list) -> dict:
    """Trials by state, lost ones (killed workers) apart, and pruned ones by rule: ``{"trials", "complete", "pruned", "pruned_by", ...}``."""
    counts = {"trials": len(rows), "complete": 0, "pruned": 0, "fail": 0, "lost": 0, "running": 0, "pruned_by": {}}
    for r in rows:
        if r.get("lost"):
            counts["lost"] += 1
            continue
        state = r["state"].lower()
        counts[state] = counts.get(state, 0) + 1
        if r["state"] == "PRUNED":
            rule = r.get("pruned_by", "unknown")
            counts["pruned_by"][rule] = counts["pruned_by"].get(rule, 0) + 1
    return counts


def to_markdown(front: list, settings: dict) -> str:
    delta = settings.get("max_ppl_delta")
    cap = "" if delta is None else f", perplexity at most {100 * delta:g}% above dense"
    lines = [f"Pareto front of `{settings['template']}` (KV budget {settings['budget']}{cap}, calibration split)", "",
             "| trial | recipe | KV fraction | ppl ratio | needle acc | decode tok/s | speed / dense |", "|---|---|---|---|---|---|---|"]
    for r in front:
        niah = "-" if r.get("niah") is None else f"{r['niah']:.3f}"
        tps = "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.1f}"
        sp = "-" if r.get("speed_ratio") is None else f"{r['speed_ratio']:.2f}"
        lines.append(f"| {r['number']} | `{r['recipe']}` | {r['kv_fraction']:.3f} | {r['ppl_ratio']:.4f} | {niah} | {tps} | {sp} |")
    return "\n".join(lines) + "\n"


def plot_front(rows: list, front: list, path) -> Path:
    """KV fraction vs perplexity ratio for every completed trial; colour: decode tokens/s; the front outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..eval.plot import save_figure

    done = [r for r in rows if r["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if done:
        ratio = all(r.get("speed_ratio") is not None for r in done)
        colour = [r["speed_ratio"] if ratio else (r.get("tokens_per_s") or 0) for r in done]
        sc = ax.scatter([r["kv_fraction"] for r in done], [r["ppl_ratio"] for r in done], c=colour, cmap="viridis")
        fig.colorbar(sc, ax=ax, label="decode tokens/s / dense" if ratio else "decode tokens/s")
    if front:
        ax.plot([r["kv_fraction"] for r in front], [r["ppl_ratio"] for r in front], "o-", mfc="none", color="red", label="Pareto front")
        ax.legend()
    ax.set_xlabel("KV bytes held / dense")
    ax.set_ylabel("perplexity / dense")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def write_outputs(result: dict, model, tokenizer) -> dict:
    """Write pareto.json/.md/.png, recipes/trial-N.toml and winner.json/winner_report.txt; returns what was written."""
    from ..compile import compile as gw_compile
    from ..recipes import Recipe
    from .objectives import Evaluator

    out, settings = Path(result["out"]), result["settings"]
    niah = bool(settings["eval"]["niah_cases"])
    front = pareto_front(result["trials"], settings["budget"], niah, "speed" in settings.get("objectives", ()), settings.get("min_speed"),
                         settings.get("max_ppl_delta"))
    (out / "recipes").mkdir(exist_ok=True)
    for r in front:
        path = out / "recipes" / f"trial-{r['number']}.toml"
        path.write_text(Recipe.parse(r["recipe"]).to_toml())
        r["toml"] = str(path)
    (out / "pareto.json").write_text(json.dumps({"front": front, "counts": trial_counts(result["trials"])}, indent=2, default=str))
    (out / "pareto.md").write_text(to_markdown(front, settings))
    plot_front(result["trials"], front, out / "pareto.png")
    files = [str(out / f) for f in ("pareto.json", "pareto.md", "pareto.png")] + [r["toml"] for r in front]
    written = {"pareto": front, "counts": trial_counts(result["trials"]), "files": files}
    if not front:
        written["winner"] = None
        return written
    rule = settings.get("winner", "ppl")
    best = pick_winner(front, rule, settings.get("winner_ppl_cap") if rule == "niah+ppl" else None)
    cm = gw_compile(model, recipe=best["toml"], tokenizer=tokenizer, backend=settings["backend"])  # the TOML compile() takes
    ev = Evaluator(model, tokenizer, split="heldout", backend=settings["backend"], seed=settings["seed"], **settings["eval"])
    base = ev.base()
    held = ev.evaluate(best["toml"], base=base)
    report = cm.report()
    winner = {"trial": best["number"], "recipe": best["recipe"], "toml": best["toml"], "calibration": {k: best[k] for k in
              ("kv_fraction", "ppl_ratio", "niah", "tokens_per_s")}, "heldout": {k: held[k] for k in ("kv_fraction", "ppl_ratio", "ppl", "niah",
              "kv_bytes", "tokens_per_s")}, "heldout_dense_ppl": base["ppl"], "report": report.to_dict()}
    (out / "winner.json").write_text(json.dumps(winner, indent=2, default=str))
    (out / "winner_report.txt").write_text(str(report))
    written["winner"] = winner
    written["files"] += [str(out / "winner.json"), str(out / "winner_report.txt")]
    return written
