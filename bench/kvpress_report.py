"""Scoring, table and plot for ``bench/kvpress_side_by_side.py`` (graphwright recipes vs kvpress presses).

Every row of the table is one (side, method, mode, budget, length group): needle accuracy with its seeded
95% percentile-bootstrap interval (``graphwright.eval.stats``), the paired difference from the same side's
dense run on the same cases, the mean cache bytes held after compression and their fraction of that side's
dense bytes, and (for kvpress's SnapKV and StreamingLLM and both dense runs) the fraction of cases whose
answer token ids equal graphwright's ``snapkv`` / ``streaming`` / dense answer at the same budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from graphwright.eval.niah import is_correct
from graphwright.eval.plot import save_figure
from graphwright.eval.stats import bootstrap_mean, paired_difference

# kvpress press -> the graphwright recipe (``label``) that implements the same scorer at the same budget; answers
# are compared case by case. SnapKV and dense are the same algorithm (identical answers expected); the others
# differ in details the README lists (StreamingLLM: positions; AdaKV: masking vs packing; TOVA, Knorm,
# ExpectedAttention: our re-implementations of the papers, run once after prefill as kvpress does).
# StreamingLLM's twin is ``evict(score='knorm', budget={budget}, sinks=4, window={window})``: sinks + window fill the
# budget, so no token is scored and the kept set is StreamingLLM's, once after prefill with keys at their original
# positions, as kvpress does (``streaming`` re-indexes positions and keeps evicting at every decode step).
# A tuple lists several twins, the first preferred (AdaKV: graphwright run with kvpress's split is the same algorithm,
# the official split its nearest).
SAME_ALGORITHM = {"dense": "dense", "SnapKV": "snapkv", "StreamingLLM": "evict(score=knorm,sinks=4)",
                  "KeyRerotation(StreamingLLM)": "streaming(sinks=4)",
                  "AdaKV(SnapKV)": ("snapkv(heads=adaptive,split=kvpress)", "snapkv(heads=adaptive)"),
                  "CriticalKV(SnapKV)": "evict(score=criticalkv)", "CriticalAdaKV(SnapKV)": "evict(score=criticalkv,rule=adaptive)",
                  "TOVA": "evict(score=tova,when=prefill)", "Knorm": "evict(score=knorm)", "KeyDiff": "evict(score=keydiff)",
                  "ExpectedAttention": "evict(score=expected_attention)", "DuoAttention(graphwright heads)": "duo(sinks=4,window=256)",
                  "ChunkKV(SnapKV)": "evict(score=chunkkv)", "PyramidKV": "snapkv(pyramid=20)",
                  "LagKV": "evict(score=lagkv)", "QFilter(graphwright filters)": "evict(score=qfilter)",
                  "Finch": "evict(score=finch)", "Finch(rerotate)": ("evict(score=finch,rerotate=True)", "evict(score=finch)"),
                  "Finch(chunk=256)": "evict(score=finch,chunk=256)",
                  "KVzip": "evict(score=kvzip)"}
# pairs whose algorithms differ in a documented detail (README-kvpress "Nearest twins"): compared all the same, marked
# "nearest" in the table. ChunkKV: kvpress chunks the whole prompt (its observation window scored max, so the window's
# chunks win; 13 of 52 chunks = 244 tokens at 25%), graphwright always keeps the window and chunks the rest (11 chunks +
# 32 = 252). PyramidKV: at beta 20 kvpress falls back to SnapKV unless k_min = S(1-r)/beta >= the window (here it always
# does), graphwright runs the official schedule (ALGORITHMS-2 section 4). KeyRerotation(StreamingLLM): streaming evicts
# at every step. AdaKV: kvpress's safeguard forces int(0.2 n_kept) top tokens per head (window included), the official
# rule (graphwright's default) mixes n_h <- round(0.8 n_h + 0.2 C) (bench/kvpress_adakv_kept.py shows it is the only
# difference); graphwright's ``snapkv(heads='adaptive', split='kvpress')`` runs kvpress's rule. An entry is a press (all
# its twins nearest) or a (press, twin label) pair.
# Finch(rerotate): kvpress's default re-rotates the kept keys to 0..n-1 (later tokens after them): the same algorithm as
# evict(score='finch', ..., rerotate=True) (session 15); without rerotate graphwright keeps
# positions, the twin of FinchPress(rerotate_keys=False) ("Finch").
NEAREST = {"ChunkKV(SnapKV)", "PyramidKV", "KeyRerotation(StreamingLLM)", ("AdaKV(SnapKV)", "snapkv(heads=adaptive)"),
           ("Finch(rerotate)", "evict(score=finch)")}


def twins(method: str) -> tuple:
    """The graphwright labels paired with a kvpress press (``SAME_ALGORITHM``), preferred first; () when none."""
    t = SAME_ALGORITHM.get(method)
    return () if t is None else (t,) if isinstance(t, str) else tuple(t)


def is_nearest(method: str, twin_label: str) -> bool:
    return method in NEAREST or (method, twin_label) in NEAREST


def family(method: str) -> str:
    """A recipe template's pass names joined by '+' ('snapkv(budget={budget})' -> 'snapkv')."""
    return "+".join(part.split("(")[0].strip() for part in method.split("+"))


def label(method: str) -> str:
    """A recipe template without its budget-filled arguments, spaces and quotes: the method whatever the budget.

    ``"snapkv(budget={budget}, heads='adaptive')"`` -> ``"snapkv(heads=adaptive)"``, ``"snapkv(budget={budget})"`` ->
    ``"snapkv"``, ``"evict(score='tova', budget={budget})"`` -> ``"evict(score=tova)"``; fixed arguments stay."""
    parts = []
    for part in method.split("+"):
        name, _, rest = part.strip().partition("(")
        args = [a.strip().replace("'", "").replace('"', "").replace(" ", "") for a in rest.rstrip(")").split(",") if a.strip()]
        args = [a for a in args if "{" not in a]
        parts.append(name.strip() + (f"({','.join(args)})" if args else ""))
    return "+".join(parts)


def score_rows(rows, cases, tok) -> list:
    """Rows with the decoded answer, exact-match ``correct`` (``niah.is_correct``) and the case's length."""
    by_id = {c["id"]: c for c in cases}
    out = []
    for r in rows:
        c = by_id[r["id"]]
        # rows imported from the long suite's journal carry the decoded answer only (same decode settings)
        ans = tok.decode(r["new_ids"], skip_special_tokens=True) if "new_ids" in r else r["answer"]
        out.append({**r, "length": c["length"], "answer": ans, "correct": bool(is_correct(ans, c["activity"]))})
    return out


def _groups(rows):
    g: dict = {}
    for r in rows:
        g.setdefault((r["method"], r["budget"], r["mode"]), []).append(r)
    return g


def summarise(raw: dict, seed: int = 0) -> list:
    """Table rows for ``{"graphwright": scored rows, "kvpress": scored rows}``."""
    table = []
    ours = _groups(raw.get("graphwright", []))
    for side, rows in raw.items():
        groups = _groups(rows)
        dense = next((v for (m, _, _), v in groups.items() if m == "dense"), None)
        dense_by_id = {r["id"]: r for r in dense} if dense else {}
        for (method, budget, mode), rs in groups.items():
            twin = _twin(ours, side, method, budget, mode)
            lengths = sorted({r["length"] for r in rs})
            for length in lengths + (["all"] if len(lengths) > 1 else []):
                pick = [r for r in rs if length == "all" or r["length"] == length]
                acc = bootstrap_mean([float(r["correct"]) for r in pick], seed)
                row = {"side": side, "method": method, "family": family(method) if side == "graphwright" else method,
                       "label": label(method) if side == "graphwright" else method,
                       "mode": mode, "budget": budget, "length": length, "accuracy": acc["mean"], "lo": acc["lo"], "hi": acc["hi"],
                       "n": acc["n"], "cache_bytes": float(np.mean([r["cache_bytes"] for r in pick]))}
                base = [dense_by_id.get(r["id"]) for r in pick]
                if all(b is not None for b in base):
                    d = paired_difference([float(b["correct"]) for b in base], [float(r["correct"]) for r in pick], seed)
                    row |= {"delta": d["mean"], "delta_lo": d["lo"], "delta_hi": d["hi"],
                            "bytes_fraction": row["cache_bytes"] / float(np.mean([b["cache_bytes"] for b in base]))}
                if twin is not None:
                    tw = {r["id"]: r for r in twin}
                    both = [r for r in pick if r["id"] in tw]
                    if both:  # token ids where both rows have them, else the decoded answers
                        row["same_n"] = len(both)
                        row["same_answers_as_graphwright"] = float(np.mean([
                            r["new_ids"] == tw[r["id"]]["new_ids"] if "new_ids" in tw[r["id"]] else r["answer"] == tw[r["id"]]["answer"]
                            for r in both]))
                table.append(row)
    return table


def _twin(ours_groups, side, method, budget, mode="aware"):
    """graphwright's rows for the same algorithm, budget and mode as a kvpress press (None when there is none)."""
    for fam in (twins(method) if side == "kvpress" else ()):
        for (m, b, md), rs in ours_groups.items():
            if (label(m) if m != "dense" else "dense") == fam and b == budget and md == mode:
                return rs
    return None


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Model `{s['model']}`, needle prompts of {s['lengths']} tokens, {s['cases_per_length']} cases per length "
             f"(seed {s['seed']}), greedy, {s['max_new_tokens']} new tokens. Budget = fraction of the prompt kept.", "",
             "| side | method | mode | budget | length | accuracy [95% CI] | vs dense [95% CI] | cache MiB after prefill | "
             "fraction of dense | same answers as graphwright | n |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (str(r["length"]), r["side"], r["method"] != "dense", r["method"], r["mode"],
                                                    -(r["budget"] or 1))):
        delta = f"{r['delta']:+.2f} [{r['delta_lo']:+.2f}, {r['delta_hi']:+.2f}]" if "delta" in r else "-"
        lines.append(f"| {r['side']} | `{r['method']}` | {r['mode']} | {_f(r['budget'], '{:g}')} | {r['length']} | "
                     f"{r['accuracy']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] | {delta} | {r['cache_bytes'] / 2**20:.2f} | "
                     f"{_f(r.get('bytes_fraction'))} | {_f(r.get('same_answers_as_graphwright'))} | {r['n']} |")
    notes = ["", "graphwright bytes: `cm.last_stats[" + repr(s["graphwright_bytes"]) + "]` after a prefill-only generate; kvpress "
             "bytes: storage of every tensor in its cache after the compression forward pass. 'vs dense' is the paired "
             "difference from the same side's dense run on the same cases. Modes: aware = the whole prompt compressed "
             "(question in the observation window); agnostic = the context compressed alone (graphwright: `cm.prefill`), "
             "then the question fed through decode steps."]
    if s.get("kvpress_skipped"):
        notes.append(f"kvpress side skipped: {s['kvpress_skipped'].splitlines()[0]}")
    for k, v in (s.get("kvpress_errors") or {}).items():
        notes.append(f"kvpress {k} did not run: {v}")
    return "\n".join(lines + notes) + "\n"


def pairs(result: dict, seed: int = 0) -> list:
    """Each kvpress press beside its graphwright twin (``SAME_ALGORITHM``) at the same budget and mode, per length, on the
    cases both sides answered: both accuracies with 95% bootstrap intervals, the paired difference (graphwright -
    kvpress), identical answers and the mean bytes held; ``nearest`` for the pairs of ``NEAREST``."""
    raw = result["raw"]
    ours: dict = {}
    for r in raw.get("graphwright", []):
        ours.setdefault(("dense" if r["method"] == "dense" else label(r["method"]), r["budget"], r["length"], r["mode"]), {})[r["id"]] = r
    theirs: dict = {}
    for r in raw.get("kvpress", []):
        if r["method"] in SAME_ALGORITHM:
            theirs.setdefault((r["method"], r["budget"], r["length"], r["mode"]), {})[r["id"]] = r
    out = []
    for (method, budget, length, mode), kv in theirs.items():
        for twin_label in twins(method):  # one row per twin
            gw = ours.get((twin_label, budget, length, mode), {})
            ids = sorted(set(kv) & set(gw))
            if not ids:
                continue
            a = [float(kv[i]["correct"]) for i in ids]
            b = [float(gw[i]["correct"]) for i in ids]
            same = [kv[i]["new_ids"] == gw[i]["new_ids"] if "new_ids" in gw[i] else kv[i]["answer"] == gw[i]["answer"] for i in ids]
            ka, ga, d = bootstrap_mean(a, seed), bootstrap_mean(b, seed), paired_difference(a, b, seed)
            out.append({"press": method, "twin": gw[ids[0]]["method"], "nearest": is_nearest(method, twin_label), "mode": mode, "budget": budget,
                        "length": length, "n": len(ids),
                        "kvpress": ka, "graphwright": ga, "delta": d, "identical": int(sum(same)),
                        "differ": [i for i, x in zip(ids, same) if not x],
                        "kvpress_bytes": float(np.mean([kv[i]["cache_bytes"] for i in ids])),
                        "graphwright_bytes": float(np.mean([gw[i]["cache_bytes"] for i in ids]))})
    return sorted(out, key=lambda p: (str(p["length"]), p["mode"], p["press"] != "dense", p["press"], p["nearest"],
                                      -(p["budget"] or 1)))


def pairs_markdown(result: dict) -> str:
    ci = lambda x: f"{x['mean']:.2f} [{x['lo']:.2f}, {x['hi']:.2f}]"  # noqa: E731
    lines = ["| kvpress press | graphwright twin | mode | budget | length | n | kvpress accuracy [95% CI] | graphwright accuracy [95% CI] | "
             "graphwright - kvpress [95% CI] | identical answers | kvpress MiB | graphwright MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result.get("pairs", []):
        d = p["delta"]
        twin = f"`{p['twin']}`" + (" (nearest)" if p.get("nearest") else "")
        lines.append(f"| `{p['press']}` | {twin} | {p.get('mode', 'aware')} | {_f(p['budget'], '{:g}')} | {p['length']} | {p['n']} | "
                     f"{ci(p['kvpress'])} | "
                     f"{ci(p['graphwright'])} | {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] | {p['identical']} of {p['n']} | "
                     f"{p['kvpress_bytes'] / 2**20:.2f} | {p['graphwright_bytes'] / 2**20:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> Path:
    """Accuracy (all lengths) vs cache MiB held after prefill, one line per method per side (and mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = {r["length"] for r in result["rows"]}
    pick = "all" if "all" in lengths else next(iter(lengths), None)
    rows = [r for r in result["rows"] if r["length"] == pick]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    series: dict = {}
    for r in rows:
        name = f"{r['side']}: {r.get('label', r['family'])}" + (f" ({r['mode']})" if r["method"] != "dense" else "")
        series.setdefault(name, []).append(r)
    colors = plt.get_cmap("tab20").colors  # more series than the default 10-colour cycle
    for i, (name, rs) in enumerate(sorted(series.items())):
        rs.sort(key=lambda r: r["cache_bytes"])
        dense = rs[0]["method"] == "dense"
        ax.errorbar([r["cache_bytes"] / 2**20 for r in rs], [r["accuracy"] for r in rs],
                    yerr=[[r["accuracy"] - r["lo"] for r in rs], [r["hi"] - r["accuracy"] for r in rs]],
                    marker="*" if dense else ("o" if name.startswith("graphwright") else "s"), markersize=10 if dense else 5,
                    linestyle="-" if name.startswith("graphwright") else "--", capsize=3, label=name, color=colors[i % len(colors)])
    ax.set_xlabel("cache held after prefill (MiB, mean over cases)")
    ax.set_ylabel(f"needle accuracy (length {pick})")
    ax.set_title("graphwright recipes vs kvpress presses, same needle cases", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def write_report(result: dict, out) -> list:
    """``kvpress_side_by_side.json``, ``.md`` and ``.png`` in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "kvpress_side_by_side.json", out / "kvpress_side_by_side.md"
    result = {**result, "pairs": pairs(result, result.get("settings", {}).get("seed", 0))}
    js.write_text(json.dumps(result, indent=1, default=str))
    md.write_text(to_markdown(result) + "\nEach kvpress press beside graphwright's implementation of the same algorithm, on the "
                  "cases both sides answered (identical answers: equal answer token ids, or equal text for rows imported from "
                  "the suite; nearest: the algorithms differ in a detail bench/README-kvpress.md names):\n\n" + pairs_markdown(result))
    return [js, md, plot(result, out / "kvpress_side_by_side.png")]
