"""Long-text perplexity side by side with NVIDIA kvpress: the same held-out windows, the same budgets, paired.

Usage:
    bash bench/setup_kvpress.sh                                        # once (bench/README-kvpress.md)
    python bench/kvpress_ppl.py --windows 8 --presses SnapKV "ChunkKV(SnapKV)" StreamingLLM --budgets 0.5 0.25 \
        --pair 0.25 'snapkv(budget=512, gamma=0.5, heads="scores")' --out bench/results/kvpress/ppl
    python bench/kvpress_ppl.py ... --table-only                       # the table from both journals, nothing run

graphwright's side is what ``bench/long_ppl.py`` (or ``graphwright eval --suite long``) wrote to ``--journal``: this
script never runs graphwright recipes, it reads their rows (``kvpress_ruler.our_rows``: only rows whose key is the key
those scripts give the window today). The windows are the suite's (``eval.suite.build_cases``: consecutive 4,096-token
windows of the held-out part of the novel); each side prefills ``--prefix`` tokens and scores tokens prefix + 1 .. 4,095.

kvpress's side: ``bench/kvpress_ppl_worker.py`` in ``bench/.venv-kvpress`` (each press compresses the prefill once in
its forward pass, then the continuation is one teacher-forced pass over that cache, appended), on the weights
graphwright loaded, written once as a safetensors folder. ``--budgets`` are fractions of the prefill kvpress keeps
(``compression_ratio = 1 - fraction``), the prompt graphwright's one-shot compressors see too: ``snapkv(budget=512)``
keeps 25% of a 2,048-token prefill.

Written to ``--out``: ``table.md`` / ``table.json`` (every method's perplexity with a 95% bootstrap interval over
windows, the paired change from its own side's dense run and from graphwright's dense run, KV bytes held after the
last scored token over its own dense run's, the two dense runs' per-window agreement, and per ``--pair`` kvpress's
best press at that budget against the graphwright recipe: ahead when the whole interval of ppl_ours / ppl_kvpress - 1
is below 0) and ``frontier.png`` (perplexity change against KV bytes held, both sides; methods run on every window).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KVPRESS_PY = HERE / ".venv-kvpress" / "bin" / "python"
DEFAULT_PRESSES = ["SnapKV", "ChunkKV(SnapKV)", "AdaKV(SnapKV)", "ExpectedAttention", "StreamingLLM", "TOVA", "Knorm"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--journal", default=str(HERE / "results" / "suite" / "ppl" / "cases.jsonl"),
                   help="graphwright's rows (JSONL of bench/long_ppl.py)")
    p.add_argument("--presses", nargs="+", default=DEFAULT_PRESSES)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25], help="fractions of the prefill kvpress keeps")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("BUDGET", "RECIPE"),
                   help="compare graphwright RECIPE (as the journal spells it) with kvpress's best press at BUDGET; repeatable")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the kvpress worker")
    p.add_argument("--out", required=True)
    p.add_argument("--kvpress-python", default=str(KVPRESS_PY))
    p.add_argument("--model-dir", default=None, help="safetensors folder for the kvpress side (default: bench/.cache-kvpress/MODEL)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    if not 1 <= a.prefix <= a.window - 2:
        p.error(f"--prefix must be in [1, --window - 2 = {a.window - 2}]; got {a.prefix}")
    bad = [b for b in a.budgets if not 0.0 < b < 1.0]
    if bad:
        p.error(f"--budgets are fractions of the prefill kept, in (0, 1); got {bad}")
    from kvpress_ruler import check_pairs

    check_pairs(p, a)
    return a


def build(tok, args) -> list:
    """The windows as ``{id, ids, key}`` (``key``: the journal key fields ``case_jobs`` gives the window)."""
    from graphwright.eval.suite import build_cases, case_jobs

    cases = build_cases(tok, ("ppl",), (), 1, (), (), ppl_windows=args.windows, ppl_window=args.window)
    return [{"id": key["case"], "ids": w.reshape(-1).tolist(), "key": key}
            for _, w, key in case_jobs(tok, cases, args.prefix, 16, "torch")]


def run_worker(args, tok, model, windows: list, out: Path) -> None:
    import kvpress_side_by_side as sbs

    py = Path(args.kvpress_python)
    if not py.is_file():
        raise SystemExit(sbs.SETUP.format(py=py))
    model_dir = sbs.save_model_dir(model, tok, Path(args.model_dir) if args.model_dir else HERE / ".cache-kvpress" / args.model)
    spec = {"model": args.model, "model_dir": str(model_dir), "presses": args.presses, "budgets": args.budgets,
            "prefix": args.prefix, "journal": str(out / "kvpress_ppl.jsonl"),
            "windows": [{"id": w["id"], "ids": w["ids"]} for w in windows]}
    spec_path = out / "kvpress_ppl_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    subprocess.run([str(py), str(HERE / "kvpress_ppl_worker.py"), str(spec_path)], check=True, env=env)


def kvpress_rows(out: Path, windows: list, args) -> dict:
    """``{method label: {window id: row}}`` from the worker's journal, for exactly these windows and this prefix."""
    from kvpress_worker import ids_hash, load_journal  # noqa: E402  (bench/ is on sys.path)

    by_id = {w["id"]: w for w in windows}
    got: dict = {}
    for key, row in load_journal(out / "kvpress_ppl.jsonl").items():
        k = json.loads(key)
        w = by_id.get(k["window"])
        if w is None or k["prefix"] != args.prefix or k["case_hash"] != ids_hash(w["ids"], args.prefix):
            continue
        label = "dense" if row["method"] == "dense" else f"{row['method']}@{row['budget']}"
        got.setdefault(label, {})[k["window"]] = row
    return got


def summarise(ours: dict, theirs: dict, windows: list, args) -> dict:
    from kvpress_ruler import common_cases, pair_cells

    from graphwright.eval.stats import paired_ppl_ratio, perplexity_interval

    order = [w["id"] for w in windows]
    gw_dense, kv_dense = ours["dense"], theirs.get("dense", {})

    def method(side, label, rows, own_dense, bytes_key):
        ids = [i for i in order if i in rows and i in own_dense and i in gw_dense]
        if not ids:
            return None
        nll = [rows[i]["nll"] for i in ids]
        kv_fraction = sum(rows[i][bytes_key] for i in ids) / sum(own_dense[i][bytes_key] for i in ids)
        return {"side": side, "method": label, "n": len(ids), "ppl": perplexity_interval(nll), "kv_fraction": kv_fraction,
                "vs_own_dense": paired_ppl_ratio([own_dense[i]["nll"] for i in ids], nll),
                "vs_graphwright_dense": paired_ppl_ratio([gw_dense[i]["nll"] for i in ids], nll)}

    rows = [m for lab, rs in ours.items() if (m := method("graphwright", lab, rs, gw_dense, "kv_bytes"))]
    if kv_dense:
        rows += [m for lab, rs in theirs.items() if (m := method("kvpress", lab, rs, kv_dense, "cache_bytes"))]
    same = [i for i in order if i in gw_dense and i in kv_dense]
    agree = {"n": len(same), "max_abs_nll_difference": max((abs(gw_dense[i]["nll"] - kv_dense[i]["nll"]) for i in same), default=None)}
    verdicts = []
    for b, label in args.pair:
        b = float(b)
        label, mine, cells = pair_cells(ours, theirs, b, label)
        if not mine or not cells:
            continue
        full, ids, fewer = common_cases(cells, mine, order)
        if not ids:
            continue
        best = min(full, key=lambda lab: (sum(cells[lab][i]["nll"] for i in ids), lab))
        d = paired_ppl_ratio([cells[best][i]["nll"] for i in ids], [mine[i]["nll"] for i in ids])
        verdicts.append({"budget": b, "ours": label, "kvpress_best": best, "n": len(ids), "fewer_windows": fewer,
                         "ours_ppl": perplexity_interval([mine[i]["nll"] for i in ids]),
                         "kvpress_ppl": perplexity_interval([cells[best][i]["nll"] for i in ids]), "ours_over_kvpress": d,
                         "verdict": "ahead" if d["hi"] < 0 else "behind" if d["lo"] > 0 else "level"})
    return {"windows": args.windows, "window": args.window, "prefix": args.prefix, "rows": rows, "dense_agreement": agree,
            "best_vs_best": verdicts}


def _pct(d) -> str:
    return f"{100 * d['ratio_minus_1']:+.1f}% [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def to_markdown(res: dict) -> str:
    lines = [f"Long-text perplexity: {res['windows']} held-out windows of {res['window']} tokens, {res['prefix']} prefilled "
             f"(compressed there), tokens {res['prefix'] + 1}..{res['window'] - 1} scored; graphwright rows from its journal "
             "(`bench/long_ppl.py`), kvpress rows from `bench/kvpress_ppl_worker.py` on the same token ids.", "",
             "| side | method | windows | ppl [95% CI] | vs own dense | vs graphwright dense | KV held / own dense |",
             "|---|---|---:|---|---|---|---:|"]
    for r in sorted(res["rows"], key=lambda r: (r["side"] != "graphwright", r["method"] != "dense", r["ppl"]["ppl"])):
        p = r["ppl"]
        own = "" if r["method"] == "dense" else _pct(r["vs_own_dense"])
        lines.append(f"| {r['side']} | `{r['method']}` | {r['n']} | {p['ppl']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}] | {own} | "
                     f"{_pct(r['vs_graphwright_dense'])} | {r['kv_fraction']:.3f} |")
    a = res["dense_agreement"]
    if a["n"]:
        lines += ["", f"Dense on both sides, per window: mean NLL within {a['max_abs_nll_difference']:.1e} on {a['n']} windows."]
    if res["best_vs_best"]:
        lines += ["", "| kvpress budget | kvpress best press | its ppl | graphwright recipe | its ppl | ppl graphwright / kvpress - 1, paired | verdict |",
                  "|---:|---|---|---|---|---|---|"]
        for v in res["best_vs_best"]:
            o, k = v["ours_ppl"], v["kvpress_ppl"]
            lines.append(f"| {v['budget']} | `{v['kvpress_best']}` | {k['ppl']:.3f} | `{v['ours']}` | {o['ppl']:.3f} | "
                         f"{_pct(v['ours_over_kvpress'])} ({v['n']}) | **{v['verdict']}** |")
        lines += ["", "kvpress's best press is picked on these very windows (a winner's curse in its favour)."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> Path:
    """Perplexity change vs own dense against KV bytes held, one marker per method, both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    n_all = max(r["n"] for r in res["rows"])
    for r in res["rows"]:
        if r["method"] == "dense" or r["n"] < n_all:  # a press stopped on fewer windows is in the table, not the plot
            continue
        d = r["vs_own_dense"]
        y, lo, hi = (100 * d[k] for k in ("ratio_minus_1", "lo", "hi"))
        style = dict(marker="o", color="tab:blue") if r["side"] == "graphwright" else dict(marker="s", color="tab:orange")
        ax.errorbar([r["kv_fraction"]], [y], yerr=[[y - lo], [hi - y]], linestyle="none", **style)
        ax.annotate(r["method"][:40], (r["kv_fraction"], y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(2.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("KV bytes held after the last scored token / own dense")
    ax.set_ylabel("perplexity vs own dense (%)")
    ax.set_title(f"graphwright (circles) vs kvpress (squares): {res['windows']} windows of {res['window']}, prefill {res['prefix']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    import kvpress_side_by_side as sbs
    from kvpress_ruler import our_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = (None, sbs.load_tokenizer(args.model)) if args.table_only else sbs.load(args.model)
    windows = build(tok, args)
    ours = our_rows(Path(args.journal), windows, args.model)
    if not args.table_only:
        run_worker(args, tok, model, windows, out)
    res = summarise(ours, kvpress_rows(out, windows, args), windows, args)
    (out / "table.json").write_text(json.dumps(res, indent=2))
    (out / "table.md").write_text(to_markdown(res))
    plot(res, out / "frontier.png")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
