"""graphwright's best recipes against kvpress's best press at each budget, on the same needle cases (issue 18).

Usage (after ``kvpress_side_by_side.py`` and the kvpress workers have filled the journals in ``--out``):

    python bench/kvpress_best.py --first 20 \
        --pair 0.5 "snapkv(budget={budget}, heads='scores', gamma=0.5)" --pair 0.25 "snapkv(budget={budget}, heads='scores', gamma=0.5)" \
        --pair 0.5 "duo(retrieval=0.375, sinks=4, window=128)" --pair 0.25 "duo(retrieval=0.2, sinks=4, window=32)" \
        --pair 0.25 "agnostic:evict(score='kvzip', budget={frac})"

Cases: the first ``--first`` cases of each length in spread order (``kvpress_side_by_side.spread``). kvpress's best
press at a budget is the press with the highest needle accuracy among those that answered every one of these cases at
that budget, over the modes in ``--modes`` (default both: question-aware presses, and question-agnostic ones, shown as
``PRESS (agnostic)``, which compress the context alone and then read the question uncompressed; ties: all listed, the
first by name is compared). Picking the best on the very cases it is compared on favours kvpress (a winner's curse), so
"ahead" is the conservative direction. A ``--pair BUDGET TEMPLATE`` puts a graphwright recipe at a budget, run
question-aware, or question-agnostic with the prefix ``agnostic:``: a template with a field (``{budget}``, ``{frac}``)
is filled for that budget (its rows must be in the journal), a fixed recipe (no field, e.g. a ``duo`` setting) is
compared as it is (its MiB say where it stands). Reported per pair: both accuracies with a seeded 95% bootstrap
interval, graphwright - kvpress paired on the same cases with its interval, the cache MiB each side holds after the
compression step (agnostic: the compressed context, before the question), and a verdict: ahead (the paired interval
is above 0), behind (below 0) or level (it spans 0). graphwright's best pair per budget (highest accuracy, then fewest
MiB) is marked. Writes ``OUT/best_vs_best.md`` and ``.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MIB = 1 << 20


def verdict(lo: float, hi: float) -> str:
    return "ahead" if lo > 0 else "behind" if hi < 0 else "level"


AGNOSTIC = "agnostic:"


def press_label(method: str, mode: str) -> str:
    return method if mode == "aware" else f"{method} ({mode})"


def split_mode(template: str) -> tuple:
    """(mode, recipe template) of a ``--pair`` template: ``agnostic:RECIPE`` runs question-agnostic, else aware."""
    return ("agnostic", template[len(AGNOSTIC):]) if template.startswith(AGNOSTIC) else ("aware", template)


def best_presses(kv_rows, ids, budget, modes=("aware", "agnostic")):
    """[(accuracy, press label, rows by id)] of the presses that answered every case in ``ids`` at ``budget`` in one
    of ``modes`` (an agnostic press is labelled ``PRESS (agnostic)``), best first."""
    by_press: dict = {}
    for r in kv_rows:
        if r["mode"] in modes and r["budget"] == budget and r["id"] in ids and r["method"] != "dense":
            by_press.setdefault(press_label(r["method"], r["mode"]), {})[r["id"]] = r
    full = [(sum(rs[i]["correct"] for i in ids) / len(ids), p, rs) for p, rs in by_press.items() if set(rs) >= set(ids)]
    return sorted(full, key=lambda t: (-t[0], t[1]))


def compare(ours, kv_rows, ids, pairs, seed=0, modes=("aware", "agnostic")) -> list:
    """One result dict per ``(budget, template)`` pair (see the module docstring); kvpress's best over ``modes``."""
    from graphwright.eval.stats import bootstrap_mean, paired_difference

    out = []
    for budget, spec in pairs:
        mode, template = split_mode(spec)
        frac = budget if "{" in template else None
        mine = {r["id"]: r for r in ours if r["method"] == template and r["budget"] == frac and r["mode"] == mode and r["id"] in ids}
        if set(mine) < set(ids):
            raise SystemExit(f"{template!r} ({mode}) at {budget}: the journal holds {len(mine)} of the {len(ids)} cases; run "
                             "kvpress_side_by_side.py with this recipe first")
        ranked = best_presses(kv_rows, ids, budget, modes)
        if not ranked:
            raise SystemExit(f"no kvpress press answered all {len(ids)} cases at budget {budget}")
        acc, press, theirs = ranked[0]
        tied = [p for a, p, _ in ranked if a == acc]
        kv_c = [float(theirs[i]["correct"]) for i in ids]
        gw_c = [float(mine[i]["correct"]) for i in ids]
        a_kv, a_gw, d = bootstrap_mean(kv_c, seed), bootstrap_mean(gw_c, seed), paired_difference(kv_c, gw_c, seed)
        out.append({"budget": budget, "graphwright": template, "graphwright_mode": mode, "kvpress": press, "kvpress_tied": tied, "n": len(ids),
                    "kvpress_ranking": [(p, a) for a, p, _ in ranked],
                    "kvpress_accuracy": [a_kv["mean"], a_kv["lo"], a_kv["hi"]], "graphwright_accuracy": [a_gw["mean"], a_gw["lo"], a_gw["hi"]],
                    "delta": [d["mean"], d["lo"], d["hi"]], "verdict": verdict(d["lo"], d["hi"]),
                    "kvpress_mib": sum(theirs[i]["cache_bytes"] for i in ids) / len(ids) / MIB,
                    "graphwright_mib": sum(mine[i]["cache_bytes"] for i in ids) / len(ids) / MIB,
                    "cases_gw_only": sum(g > k for g, k in zip(gw_c, kv_c)), "cases_kv_only": sum(k > g for g, k in zip(gw_c, kv_c))})
    for budget in {r["budget"] for r in out}:  # graphwright's best pair at this budget: accuracy, then fewer MiB
        mine = [r for r in out if r["budget"] == budget]
        top = min(mine, key=lambda r: (-r["graphwright_accuracy"][0], r["graphwright_mib"]))
        for r in mine:
            r["graphwright_best"] = r is top
    return out


def markdown(res: list, n: int, modes=("aware", "agnostic")) -> str:
    f = "{:.2f} [{:.2f}, {:.2f}]".format
    which = "question-aware and question-agnostic" if len(modes) > 1 else f"question-{modes[0]}"
    lines = [f"graphwright's recipes vs kvpress's best press at the same budget, the same {n} cases; kvpress's best over its "
             f"{which} presses (`bench/kvpress_best.py`; picked on these cases: a winner's curse in its favour). "
             "Agnostic: the context compressed alone, then the question read uncompressed; its MiB are the compressed "
             "context's. **best**: graphwright's best recipe at that budget (accuracy, then MiB)", "",
             "| budget | kvpress best press (ties) | kvpress accuracy [95% CI] | kvpress MiB | graphwright recipe | graphwright accuracy [95% CI] "
             "| graphwright MiB | graphwright - kvpress, paired [95% CI] | cases only gw / only kvpress finds | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res, key=lambda r: -r["budget"]):
        d = r["delta"]
        mode = r.get("graphwright_mode", "aware")
        recipe = f"`{r['graphwright']}`" + ("" if mode == "aware" else f" ({mode})") + (" **best**" if r.get("graphwright_best") else "")
        lines.append(f"| {r['budget']} | `{r['kvpress']}`" + (f" ({', '.join(p for p in r['kvpress_tied'] if p != r['kvpress'])})"
                     if len(r["kvpress_tied"]) > 1 else "") + f" | {f(*r['kvpress_accuracy'])} | {r['kvpress_mib']:.2f} | "
                     f"{recipe} | {f(*r['graphwright_accuracy'])} | {r['graphwright_mib']:.2f} | "
                     f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | {r['cases_gw_only']} / {r['cases_kv_only']} | **{r['verdict']}** |")
    lines += ["", "kvpress ranking per budget (accuracy on these cases): " + "; ".join(
        f"{b}: " + ", ".join(f"{p} {a:.2f}" for p, a in rk) for b, rk in sorted({r["budget"]: r["kvpress_ranking"] for r in res}.items(),
                                                                             reverse=True))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import kvpress_side_by_side as sbs
    from kvpress_report import score_rows

    from graphwright.eval.journal import Journal

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "kvpress"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--first", type=int, default=20)
    p.add_argument("--pair", nargs=2, action="append", metavar=("BUDGET", "TEMPLATE"), required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=["aware", "agnostic"], choices=("aware", "agnostic"),
                   help="the kvpress presses that compete for its best: question-aware, question-agnostic or both")
    p.add_argument("--name", default="best_vs_best", help="output file stem in --out (NAME.md, NAME.json)")
    a = p.parse_args(argv)
    pairs = []
    for b, t in a.pair:
        try:
            pairs.append((float(b), t))
        except ValueError:
            p.error(f"--pair BUDGET TEMPLATE: BUDGET is a fraction such as 0.5; got {b!r}")
    out = Path(a.out)
    cases = json.loads((out / "cases.json").read_text())
    picked = sbs.spread([c for c in cases if c["length"] == a.length])[:a.first]
    if len(picked) < a.first:
        p.error(f"--first {a.first}: cases.json holds {len(picked)} cases of length {a.length}")
    ids = [c["id"] for c in picked]
    args = sbs.parse_args(["--model", a.model, "--out", str(out)])
    tok = sbs.load_tokenizer(a.model)
    ours = score_rows(sbs.journal_rows(Journal(out / "graphwright_answers.jsonl"), picked, args)[0], picked, tok)
    kv = score_rows(sbs.kvpress_journal_rows(out, picked, args), picked, tok)
    res = compare(ours, kv, ids, pairs, a.seed, tuple(a.modes))
    (out / f"{a.name}.json").write_text(json.dumps({"cases": ids, "modes": a.modes, "rows": res}, indent=1))
    (out / f"{a.name}.md").write_text(markdown(res, len(ids), tuple(a.modes)))
    print(markdown(res, len(ids), tuple(a.modes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
