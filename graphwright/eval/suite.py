"""The long-context suite: needles, RULER-style tasks and streamed perplexity, for a list of recipes.

``run_suite(model, tokenizer, recipes)`` builds every case once (seeded, offline: ``niah.needle_suite``,
``ruler.ruler_cases``, ``perplexity.heldout_windows``), runs them through the dense model and
through each recipe, and summarises every metric as a mean with its 95% bootstrap interval and
its paired difference from dense on the same cases (``stats``). The dense side is the identity
compile of the model (tested bit-exact against Hugging Face), so both sides go through the same
runtime and report the KV bytes they really held (``cm.last_stats["kv_bytes"]`` after each case).

RULER tasks the dense model does not do better than chance (``ruler.above_chance``) are kept in
the table but left out of the RULER headline. ``write_suite`` writes ``suite.json``,
``suite.md`` and ``suite.png`` (quality vs KV bytes held, one series per method).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..runtime.continuation import continuation_refusal
from . import niah as _niah
from . import ruler as _ruler
from .journal import Journal, case_hash, make_key
from .perplexity import heldout_windows, long_perplexity
from .plot import save_figure
from .stats import bootstrap_mean, paired_difference, paired_ppl_ratio, perplexity_interval

SUITE_TASKS = ("niah", "ruler", "ppl")
DENSE = "dense"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def method_of(recipe) -> str:
    """The series a recipe belongs to in the plot: its pass names joined by '+' (settings dropped)."""
    if recipe in (None, DENSE):
        return DENSE
    from ..recipes import Recipe

    return "+".join(name for name, _ in Recipe.parse(recipe).passes) or DENSE


def _score_rows(label, dense_rows, rows, key, group, seed):
    """Per group value (and 'all'): mean with interval, paired difference vs dense, KV bytes."""
    groups = sorted({r[group] for r in rows}, key=str) + ["all"]
    out = []
    for g in groups:
        pick = [i for i, r in enumerate(rows) if g == "all" or r[group] == g]
        vals = [float(rows[i][key]) for i in pick]
        base = [float(dense_rows[i][key]) for i in pick]
        kv, kv_dense = _mean(rows[i]["kv_bytes"] for i in pick), _mean(dense_rows[i]["kv_bytes"] for i in pick)
        out.append({"recipe": label, "metric": f"{group}={g}" if g != "all" else "all", **_ci(bootstrap_mean(vals, seed)),
                    **_delta(paired_difference(base, vals, seed)), "kv_bytes": kv,
                    "kv_fraction": kv / kv_dense if kv is not None and kv_dense else None})
    return out


def _ci(r):
    return {"value": r["mean"], "lo": r["lo"], "hi": r["hi"], "n": r["n"]}


def _delta(r):
    return {"delta": r["mean"], "delta_lo": r["lo"], "delta_hi": r["hi"]}


def build_cases(tokenizer, tasks=SUITE_TASKS, lengths=(1024, 2048, 4096, 8192), cases: int = 50,
                ruler_tasks=_ruler.TASKS, ruler_lengths=(1024, 2048, 4096), ppl_windows: int = 8, ppl_window: int = 4096,
                seed: int = 0) -> dict:
    """Every case of the suite as plain data (the same for every recipe)."""
    bad = [t for t in tasks if t not in SUITE_TASKS]
    if bad or not tasks:
        raise ValueError(f"suite tasks must be some of {list(SUITE_TASKS)}; got {list(tasks)}")
    out = {}
    if "niah" in tasks:
        out["niah"] = _niah.needle_suite(tokenizer, lengths=lengths, cases=cases, seed=seed)
    if "ruler" in tasks:
        out["ruler"] = _ruler.ruler_cases(tokenizer, tasks=ruler_tasks, lengths=ruler_lengths, cases=cases, seed=seed)
    if "ppl" in tasks:
        out["ppl"] = heldout_windows(tokenizer, n_windows=ppl_windows, window=ppl_window)
    return out


def canonical(recipe) -> str:
    """The label a recipe's rows are stored under: ``DENSE``, or the canonical recipe string."""
    if recipe in (None, DENSE, "noop", "identity"):
        return DENSE
    from ..recipes import Recipe

    return str(Recipe.parse(recipe))


def model_label(model) -> str:
    """A model's name for journal keys when none is given: its HF ``name_or_path``, else its class and config type."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else f"{type(model).__name__}/{getattr(model.config, 'model_type', '?')}"


def case_jobs(tokenizer, cases: dict, ppl_prefix: int, max_new_tokens: int, backend: str) -> list:
    """``[(task, case, key fields)]`` for every case, in run order; the key fields lack only model and recipe."""
    from .niah import encode

    jobs = []
    for c in cases.get("niah", []):
        ids = encode(tokenizer, c["prompt"]).input_ids
        jobs.append(("niah", c, {"mode": "aware", "task": "niah", "length": c["length"], "case": c["id"],
                                 "case_hash": case_hash(ids, c["activity"]),
                                 "settings": {"max_new_tokens": max_new_tokens, "backend": backend}}))
    for c in cases.get("ruler", []):
        ids = encode(tokenizer, c["prompt"]).input_ids
        jobs.append(("ruler", c, {"mode": "aware", "task": "ruler", "length": c["length"], "case": c["id"],
                                  "case_hash": case_hash(ids, [c["references"], c["max_new_tokens"]]),
                                  "settings": {"backend": backend}}))
    for i, w in enumerate(cases.get("ppl", [])):
        ids = w.reshape(-1).tolist()
        jobs.append(("ppl", w, {"mode": "stream", "task": "ppl", "length": len(ids), "case": f"w{i}",
                                "case_hash": case_hash(ids), "settings": {"prefix": ppl_prefix, "backend": backend}}))
    return jobs


def _run_case(cm, tokenizer, task, case, ppl_prefix, max_new_tokens, ppl_block=None) -> dict:
    """One case's row: niah/ruler the scorer's per-case row; ppl ``{"nll", "kv_bytes", "kv_bytes_dense"}`` (plus
    ``"block"`` when ``ppl_block`` scored the continuation in teacher-forced steps: ``long_perplexity``)."""
    if task == "niah":
        return _niah.run_niah(cm, tokenizer, [case], max_new_tokens=max_new_tokens, progress=False)["cases"][0]
    if task == "ruler":
        return _ruler.run_ruler(cm, tokenizer, [case], progress=False)["cases"][0]
    r = long_perplexity(cm, [case], prefix=ppl_prefix, progress=False, block=ppl_block)
    row = {"nll": r["nll"][0], "kv_bytes": r["kv_bytes"][0], "kv_bytes_dense": r["kv_bytes_dense"][0]}
    return row if ppl_block is None else {**row, "block": ppl_block}


def run_case_major(model, tokenizer, labels, jobs, order, journal, model_name, ppl_prefix, max_new_tokens,
                   backend="torch", seed=0, log=None, ppl_block=None) -> None:
    """Case by case: job ``order[0]`` for every label, then ``order[1]``...; each label compiled once, on its
    first missing row; rows the journal holds are skipped, each new row is appended at once.

    The order of the benchmark scripts that stop early on purpose (a cell cut short still covers every
    depth, every window, every task): ``run_label`` runs label by label instead. Keys and rows are
    ``run_label``'s, so ``run_suite``'s tables read them. ``log(job, label, row, seconds)`` after each row.
    ``ppl_block``: perplexity windows scored in teacher-forced continuation steps (``long_perplexity``'s
    ``block``; the same key: the scores equal the decode-step ones, tested to 1e-5)."""
    import time

    from ..compile import compile as gw_compile

    cms = {}
    for i in order:
        task, case, kf = jobs[i]
        for label in labels:
            key = make_key(model_name, label, seed=seed, **kf)
            if journal.get(key) is not None:
                continue
            if label not in cms:
                cms[label] = gw_compile(model, recipe=None if label == DENSE else label, tokenizer=tokenizer,
                                        backend=backend)
            t1 = time.perf_counter()
            row = _run_case(cms[label], tokenizer, task, case, ppl_prefix, max_new_tokens, ppl_block)
            journal.add(key, row)
            if log is not None:
                log(jobs[i], label, row, time.perf_counter() - t1)


def _warn_other_headsets(journal, label: str, keys: list) -> None:
    """Say when the journal holds rows of ``label`` made with head-set files other than today's (not shown: the recipe
    string names a shipped head set, and that file has changed since; ``journal.headsets_read``)."""
    import warnings

    now = keys[0]["settings"].get("headsets") if keys else None
    other = {json.dumps(k["settings"].get("headsets"), sort_keys=True) for k, _ in journal.records()
             if k["recipe"] == label and k["settings"].get("headsets") != now}
    if other:
        warnings.warn(f"{journal.path}: rows of {label!r} made with other head-set files ({', '.join(sorted(other))}; today "
                      f"{json.dumps(now, sort_keys=True)}) are not shown: that recipe now reads different heads", stacklevel=3)


def run_label(model, tokenizer, label, jobs, journal, model_name, seed, ppl_prefix, max_new_tokens, backend="torch",
              progress=True, run_missing=True, ppl_block: int | None = None) -> dict:
    """Every job for one recipe label: rows the journal holds are reused, the others run and are appended at once.

    ``ppl_block``: perplexity windows in continuation steps of that many tokens where they equal decode steps
    (``runtime.continuation.continuation_refusal`` is None: dense, SnapKV and its head-budget forms, duo), else one
    decode step per token; None: decode steps for every recipe. The key is the same either way; the row says ``block``.

    Compiles only when some case is missing; ``run_missing=False`` runs nothing and returns only
    the rows the journal holds. Returns the label's raw results
    (``{"niah": [rows], "ruler": [rows], "ppl": {"nll", "kv_bytes", "ids", "window", "prefix"}}``)."""
    from ..compile import compile as gw_compile

    keys = [make_key(model_name, label, seed=seed, **kf) for _, _, kf in jobs]
    todo = [i for i, k in enumerate(keys) if journal.get(k) is None]
    if todo and not run_missing:
        _warn_other_headsets(journal, label, keys)
    if todo and run_missing:
        cm = gw_compile(model, recipe=None if label == DENSE else label, tokenizer=tokenizer, backend=backend)
        block = ppl_block if ppl_block and continuation_refusal(cm) is None else None
        for i in tqdm(todo, desc=label[:40], unit="case", disable=None if progress else True, leave=False):
            task, case, _ = jobs[i]
            journal.add(keys[i], _run_case(cm, tokenizer, task, case, ppl_prefix, max_new_tokens, block))
        del cm
    res: dict = {}
    for (task, _, kf), key in zip(jobs, keys):
        row = journal.get(key)
        if row is None:
            continue
        if task == "ppl":
            p = res.setdefault("ppl", {"nll": [], "kv_bytes": [], "kv_bytes_dense": [], "ids": [], "window": kf["length"],
                                       "prefix": ppl_prefix})
            for f in ("nll", "kv_bytes", "kv_bytes_dense"):
                p[f].append(row[f])
            p["ids"].append(kf["case"])
        else:
            res.setdefault(task, []).append(row)
    return res


def _pair(dense_rows, rows):
    """The rows of both sides on the cases both have done (by case id, in dense's order)."""
    have = {r["id"]: r for r in rows}
    base = [r for r in dense_rows if r["id"] in have]
    return base, [have[r["id"]] for r in base]


def _ppl_rows(p):
    return [{"id": i, "nll": x, "kv_bytes": k} for i, x, k in zip(p.get("ids") or range(len(p["nll"])), p["nll"], p["kv_bytes"])]


def summarise(results: dict, seed: int = 0) -> dict:
    """Table rows for ``{label: per-task raw results}`` (``DENSE`` first) and the RULER chance report.

    Each recipe is paired with dense on the cases both have finished (a partial journal gives
    partial cells; ``n`` says how many cases each cell holds)."""
    dense = results[DENSE]
    rows, chance = [], None
    if dense.get("ruler"):
        chance = _ruler.above_chance(dense["ruler"], seed=seed)
    headline = sorted(t for t, c in (chance or {}).items() if c["above"])
    for label, res in results.items():
        if res.get("niah") and dense.get("niah"):
            base, mine = _pair(dense["niah"], res["niah"])
            if mine:
                rows += [{"task": "niah", **r} for r in _score_rows(label, _as_float(base), _as_float(mine), "correct", "length", seed)]
        if res.get("ruler") and dense.get("ruler"):
            base, mine = _pair(dense["ruler"], res["ruler"])
            if mine:
                rows += [{"task": "ruler", **r} for r in _score_rows(label, base, mine, "score", "task", seed)]
            pick = [i for i, r in enumerate(mine) if r["task"] in headline]
            if pick:
                sub = [mine[i] for i in pick]
                hb = [base[i] for i in pick]
                head = _score_rows(label, hb, [{**r, "headline": "+".join(headline)} for r in sub], "score", "headline", seed)[-1]
                rows.append({"task": "ruler", **head, "metric": "headline"})
        if res.get("ppl") and dense.get("ppl"):
            b, p = _pair(_ppl_rows(dense["ppl"]), _ppl_rows(res["ppl"]))
            if p:
                nb, npp = [r["nll"] for r in b], [r["nll"] for r in p]
                iv, ratio = perplexity_interval(npp, seed), paired_ppl_ratio(nb, npp, seed)
                kv, kv_dense = _mean(r["kv_bytes"] for r in p), _mean(r["kv_bytes"] for r in b)
                rows.append({"task": "ppl", "recipe": label, "metric": f"window={res['ppl']['window']},prefix={res['ppl']['prefix']}",
                             "value": iv["ppl"], "lo": iv["lo"], "hi": iv["hi"], "n": iv["n"], "delta": ratio["ratio_minus_1"],
                             "delta_lo": ratio["lo"], "delta_hi": ratio["hi"], "kv_bytes": kv,
                             "kv_fraction": kv / kv_dense if kv is not None and kv_dense else None})
    return {"rows": rows, "ruler_chance": chance, "ruler_headline_tasks": headline,
            "ruler_excluded_tasks": sorted(t for t, c in (chance or {}).items() if not c["above"])}


def _as_float(rows):
    return [{**r, "correct": float(r["correct"])} for r in rows]


def run_suite(model, tokenizer, recipes, tasks=SUITE_TASKS, lengths=(1024, 2048, 4096, 8192), cases: int = 50,
              ruler_tasks=_ruler.TASKS, ruler_lengths=(1024, 2048, 4096), ppl_windows: int = 8, ppl_window: int = 4096,
              ppl_prefix: int = 2048, max_new_tokens: int = 16, seed: int = 0, backend: str = "torch", out=None,
              progress: bool = True, journal=None, model_name: str | None = None, run_missing: bool = True,
              ppl_block: int | None = 512) -> dict:
    """Run the long-context suite on the dense model and each recipe; returns (and with ``out`` writes) the table.

    ``lengths``/``cases``: needle prompt lengths and cases per length (and per RULER task and
    length); ``ruler_lengths``; ``ppl_windows`` windows of ``ppl_window`` held-out tokens, each
    prefilled with ``ppl_prefix`` tokens and the rest scored by decode steps (``ppl_block``: in continuation steps
    of that many tokens for the recipes where that is exact, ``run_label``; None: decode steps). Every recipe sees
    exactly the dense side's cases. Resumable: every finished case is appended at once to the
    JSONL ``journal`` (default ``out/cases.jsonl``; in memory when neither is given) and a rerun
    with the same journal runs only the cases it lacks (``eval.journal``); ``model_name`` goes into
    the keys (default: the model's ``name_or_path``); ``run_missing=False`` runs no case and
    tabulates what the journal holds. Returns ``{"settings", "rows", "ruler_chance",
    "ruler_headline_tasks", "ruler_excluded_tasks", "raw", "seconds"}``.
    """
    if tokenizer is None:
        raise ValueError("run_suite needs the model's tokenizer")
    t0 = time.perf_counter()
    per_length = cases
    cases = build_cases(tokenizer, tasks, lengths, per_length, ruler_tasks, ruler_lengths, ppl_windows, ppl_window, seed)
    if journal is None and out is not None:
        journal = Path(out) / "cases.jsonl"
    jr = journal if isinstance(journal, Journal) else Journal(journal)
    name = model_name or model_label(model)
    labels = list(dict.fromkeys([DENSE] + [canonical(r) for r in recipes]))
    jobs = case_jobs(tokenizer, cases, ppl_prefix, max_new_tokens, backend)
    raw = {label: run_label(model, tokenizer, label, jobs, jr, name, seed, ppl_prefix, max_new_tokens, backend, progress,
                            run_missing, ppl_block) for label in labels}
    summary = summarise(raw, seed)
    settings = {"model": name, "tasks": list(tasks), "lengths": list(lengths), "cases": {k: len(v) for k, v in cases.items()},
                "cases_per_length": per_length, "ruler_tasks": list(ruler_tasks), "ruler_lengths": list(ruler_lengths),
                "ppl_windows": ppl_windows, "ppl_window": ppl_window, "ppl_prefix": ppl_prefix, "max_new_tokens": max_new_tokens,
                "seed": seed, "backend": backend, "ppl_block": ppl_block, "recipes": list(raw), "journal": None if jr.path is None else str(jr.path)}
    result = {"settings": settings, **summary, "raw": _jsonable(raw), "seconds": time.perf_counter() - t0}
    if out is not None:
        result["files"] = [str(p) for p in write_suite(result, out)]
    return result


def _jsonable(raw):
    return json.loads(json.dumps(raw, default=str))


def _fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{x:+.1%}" if pct else f"{x:.3g}"


def to_markdown(result: dict) -> str:
    """The table as markdown: value [95% CI], paired difference vs dense [95% CI], KV bytes and fraction held."""
    lines = ["| task | metric | recipe | value [95% CI] | vs dense [95% CI] | KV MiB held | KV fraction | n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pct = r["task"] == "ppl"
        delta = f"{_fmt(r['delta'], pct)} [{_fmt(r['delta_lo'], pct)}, {_fmt(r['delta_hi'], pct)}]"
        kv = "-" if r["kv_bytes"] is None else f"{r['kv_bytes'] / 2**20:.2f}"
        lines.append(f"| {r['task']} | {r['metric']} | `{r['recipe']}` | {_fmt(r['value'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}] | "
                     f"{delta} | {kv} | {_fmt(r['kv_fraction'])} | {r['n']} |")
    notes = ["", "ppl: value is perplexity; 'vs dense' is the relative change ppl/ppl_dense - 1. niah and ruler: value is the "
             "mean score (0-1); 'vs dense' is the paired difference on the same cases."]
    if result.get("ruler_chance"):
        notes.append(f"RULER headline tasks (dense above chance): {', '.join(result['ruler_headline_tasks']) or 'none'}; "
                     f"reported separately (dense not above chance): {', '.join(result['ruler_excluded_tasks']) or 'none'}.")
        for t, c in result["ruler_chance"].items():
            notes.append(f"- {t}: dense {c['score']['mean']:.3f}, chance {c['chance']:.3f}, "
                         f"score - chance [{c['margin']['lo']:+.3f}, {c['margin']['hi']:+.3f}]")
    return "\n".join(lines + notes) + "\n"


def plot_suite(result: dict, path) -> Path:
    """One panel per task headline (needle accuracy, RULER headline, perplexity): quality vs KV MiB held, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("niah", "all", "needle accuracy"), ("ruler", "headline", "RULER score (headline tasks)"), ("ppl", None, "perplexity")]
    panels = [p for p in panels if any(r["task"] == p[0] and (p[1] is None or r["metric"] == p[1]) for r in result["rows"])]
    if not panels:
        raise ValueError("no suite rows to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (task, metric, title) in zip(axes[0], panels):
        series: dict = {}
        for r in result["rows"]:
            if r["task"] == task and (metric is None or r["metric"] == metric) and r["kv_bytes"] is not None:
                series.setdefault(method_of(r["recipe"]), []).append(r)
        for name, rs in series.items():
            rs.sort(key=lambda r: r["kv_bytes"])
            x = [r["kv_bytes"] / 2**20 for r in rs]
            y = [r["value"] for r in rs]
            err = [[r["value"] - r["lo"] for r in rs], [r["hi"] - r["value"] for r in rs]]
            ax.errorbar(x, y, yerr=err, marker="*" if name == DENSE else "o", markersize=10 if name == DENSE else 5,
                        capsize=3, label=name)
        ax.set_xlabel("KV cache held (MiB, mean over cases)")
        ax.set_ylabel(title)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_suite(result: dict, out) -> list:
    """``suite.json``, ``suite.md`` and ``suite.png`` in the folder ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "suite.json"
    js.write_text(json.dumps(result, indent=2, default=str))
    md = out / "suite.md"
    md.write_text(to_markdown(result))
    if not result["rows"]:  # nothing finished yet (a journal without dense rows): no plot
        return [js, md]
    return [js, md, plot_suite(result, out / "suite.png")]
