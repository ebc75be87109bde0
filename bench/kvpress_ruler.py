"""kvpress's presses on the RULER-style cases graphwright's journal answered: same token ids, same scorer, paired.

Usage:
    bash bench/setup_kvpress.sh                                           # once (bench/README-kvpress.md)
    python bench/kvpress_ruler.py --length 1024 --cases 50 --tasks niah_multivalue \
        --journal bench/results/suite/ruler-L1024-mv/cases.jsonl \
        --presses SnapKV "ChunkKV(SnapKV)" "AdaKV(SnapKV)" --budgets 0.5 0.3 --round 5 \
        --pair 0.5 'duo(retrieval=0.375, sinks=4, window=128)' --pair 0.3 'snapkv(budget=256, gamma=0.5, heads="scores")' \
        --out bench/results/kvpress/ruler-L1024-mv
    python bench/kvpress_ruler.py ... --table-only                         # the table from both journals

The graphwright side is whatever ``bench/tune_heldout_ruler.py`` (or ``graphwright eval --suite long``) wrote to
``--journal`` for these cases: this script never runs graphwright recipes, it only reads their rows
(``graphwright.eval.journal.Journal``), and only rows whose key, recipe aside, is the key those scripts give the prompt
rebuilt here (``graphwright.eval.suite.case_jobs``: the same seed-0 generator, tokenizer and chat template; the same
``case_hash``, settings and graphwright/eval version), so both sides answer the very same token ids.

The kvpress side: ``bench/kvpress_worker.py`` in ``bench/.venv-kvpress`` (question-aware: the whole prompt is
compressed in one forward pass, as graphwright's one-step prefill; then greedy decoding of the task's
``max_new_tokens``, stopping at EOS), on the weights graphwright loaded, written once as a safetensors folder. Its
answers go to ``OUT/kvpress_answers.jsonl`` (resumable; ``--round R``: R cases for every press and budget in turn,
so a run stopped early leaves cells of equal size). Both sides are scored here with RULER's ``string_match_all``
(``graphwright.eval.ruler``) on the text decoded with the same tokenizer (special tokens dropped).

Budgets: kvpress's ``--budgets`` are fractions of the prompt kept (``compression_ratio = 1 - fraction``).
Bytes are each side's own: graphwright's ``kv_bytes`` held after the answer over its dense run's, kvpress's cache
storage bytes after compression over its dense run's (masking presses, AdaKV and DuoAttention, show dense bytes);
kvpress rows also give the share of the prompt kept (kept / compressed tokens).

Written to ``--out``: ``table.md`` / ``table.json``: every method's score [95% bootstrap CI] and paired difference
from graphwright's dense run on the cases both hold, the two dense runs' agreement, and per kvpress budget the best
press against each graphwright recipe ``--pair``-ed with that budget (paired, with the verdict: ahead when the interval
is above 0, behind when below). Pair a recipe only with budgets at or above the share of the prompt it keeps.
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
DEFAULT_PRESSES = ["SnapKV", "ChunkKV(SnapKV)", "AdaKV(SnapKV)", "CriticalAdaKV(SnapKV)", "ExpectedAttention", "StreamingLLM",
                   "DuoAttention(graphwright heads)"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--cases", type=int, default=50, help="cases per task (the first N of the seeded generator)")
    p.add_argument("--tasks", nargs="+", default=["niah_multivalue"])
    p.add_argument("--journal", required=True, help="graphwright's answers (JSONL of bench/tune_heldout_ruler.py)")
    p.add_argument("--presses", nargs="+", default=DEFAULT_PRESSES)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3], help="fractions of the prompt kvpress keeps")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("BUDGET", "RECIPE"),
                   help="compare graphwright RECIPE (as the journal spells it) with kvpress's best press at BUDGET (one of "
                        "--budgets); repeatable")
    p.add_argument("--round", type=int, default=5, help="the worker answers R cases for every press and budget in turn")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the kvpress worker")
    p.add_argument("--out", required=True)
    p.add_argument("--kvpress-python", default=str(KVPRESS_PY))
    p.add_argument("--model-dir", default=None, help="safetensors folder for the kvpress side (default: bench/.cache-kvpress/MODEL)")
    p.add_argument("--table-only", action="store_true", help="no worker run: the table from the journals as they are")
    a = p.parse_args(argv)
    import kvpress_side_by_side as sbs

    sbs.check_budgets_and_cases(p, a)
    check_pairs(p, a)
    return a


def check_pairs(p, a) -> None:
    """``--pair BUDGET RECIPE``: BUDGET must be one of ``--budgets`` (a parser error that says which are allowed)."""
    for b, _ in a.pair:
        try:
            ok = float(b) in a.budgets
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--pair BUDGET must be one of --budgets {a.budgets}; got {b!r}")


def pair_cells(ours: dict, theirs: dict, budget: float, label: str) -> tuple:
    """``--pair BUDGET RECIPE``: (RECIPE as the journal spells it, its rows, kvpress's {press@BUDGET: rows}); a pair
    with no rows on either side is named on stderr (its rows are empty) rather than dropped silently."""
    from graphwright.eval.suite import canonical

    label = canonical(label)  # 'evict(score=..., rule=...)' -> the journal's 'evict(budget=..., rule=...)'
    cells = {lab: rs for lab, rs in theirs.items() if lab.endswith(f"@{budget}")}
    mine = ours.get(label) or {}
    if not mine or not cells:
        print(f"--pair {budget} {label}: no " + ("graphwright rows for it in the journal (run it first)" if not mine
                                                  else f"kvpress rows at budget {budget}"), file=sys.stderr)
    return label, mine, cells


def common_cases(cells: dict, mine: dict, order: list) -> tuple:
    """(the presses that answered the most of the recipe's cases, those cases in ``order``, {press: cases} of the
    others): a press stopped earlier (fewer cases) is listed, not picked, so the pairing keeps every case the leading
    presses ran. ``cells``: {press label: {case id: row}}; ``mine``: the recipe's {case id: row}."""
    held = {lab: [i for i in order if i in mine and i in rs] for lab, rs in cells.items()}
    n_most = max((len(v) for v in held.values()), default=0)
    full = sorted(lab for lab, v in held.items() if len(v) == n_most)
    return full, (held[full[0]] if n_most else []), {lab: len(v) for lab, v in held.items() if lab not in full}


def build(tok, args) -> list:
    """The cases as ``{id, task, ids, references, max_new_tokens, case_hash, key}``, in the order graphwright ran them
    (``key``: the journal key fields ``case_jobs`` gives the case, which lack model, recipe, seed and version)."""
    from graphwright.eval.niah import encode
    from graphwright.eval.suite import build_cases, case_jobs

    cases = build_cases(tok, ("ruler",), (), args.cases, tuple(args.tasks), (args.length,), seed=0)
    out = []
    for _, c, key in case_jobs(tok, cases, 2048, 16, "torch"):
        out.append({"id": c["id"], "task": c["task"], "ids": list(encode(tok, c["prompt"]).input_ids),
                    "references": c["references"], "max_new_tokens": int(c["max_new_tokens"]), "case_hash": key["case_hash"],
                    "key": key})
    return out


def our_rows(journal: Path, cases: list, model: str) -> dict:
    """``{recipe: {case id: row}}`` of the journal's rows for exactly these prompts: the key equal to the one
    ``tune_heldout_ruler.py`` / ``run_suite`` give the case and recipe today (model, seed 0, this graphwright version, and
    the head-set files the recipe reads now: a row of ``duo(retrieval=0.375)`` answered with an earlier shipped head set
    is another method's row and is left out, as the suite's tables leave it out)."""
    from graphwright.eval.journal import Journal, make_key

    if not journal.is_file():
        raise SystemExit(f"{journal}: no such journal; run bench/tune_heldout_ruler.py for graphwright's side first")
    by_case = {c["id"]: c["key"] for c in cases}
    out: dict = {}
    for key, row in Journal(journal).records():
        k = by_case.get(key["case"])
        if k is None:
            continue
        want = make_key(model, key["recipe"], k["mode"], k["task"], k["length"], k["case"], 0, k["case_hash"], k["settings"])
        if key == want:
            out.setdefault(key["recipe"], {})[key["case"]] = row
    if "dense" not in out:
        raise SystemExit(f"{journal} holds no dense row for these {len(cases)} cases; run bench/tune_heldout_ruler.py with "
                         "the same --length, --cases and --tasks first")
    return out


def run_worker(args, tok, model, cases: list, out: Path) -> None:
    """One spec per distinct ``max_new_tokens`` (RULER sets it per task), run in the kvpress environment."""
    import kvpress_side_by_side as sbs

    py = Path(args.kvpress_python)
    if not py.is_file():
        raise SystemExit(sbs.SETUP.format(py=py))
    model_dir = sbs.save_model_dir(model, tok, Path(args.model_dir) if args.model_dir else HERE / ".cache-kvpress" / args.model)
    eos = tok.eos_token_id
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    for n_new in sorted({c["max_new_tokens"] for c in cases}):
        chunk = [c for c in cases if c["max_new_tokens"] == n_new]
        spec = {"model": args.model, "model_dir": str(model_dir), "presses": args.presses, "budgets": args.budgets,
                "modes": ["aware"], "max_new_tokens": n_new, "eos": [eos] if isinstance(eos, int) else list(eos),
                "journal": str(out / "kvpress_answers.jsonl"), "round": args.round,
                "duo_headset": str(sbs.duo_headset(args.model)), "dense": True,
                "cases": [{"id": c["id"], "ids": c["ids"], "split": len(c["ids"])} for c in chunk]}
        spec_path = out / f"kvpress_spec.new{n_new}.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([str(py), str(HERE / "kvpress_worker.py"), str(spec_path), str(out / f"kvpress_raw.new{n_new}.json")],
                       check=True, env=env)


def kvpress_rows(out: Path, cases: list, tok) -> dict:
    """``{method label: {case id: row + score}}`` from the worker's journal, scored with ``string_match_all``."""
    from kvpress_worker import ids_hash, load_journal  # noqa: E402  (bench/ is on sys.path)

    from graphwright.eval.ruler import string_match_all

    by_id = {c["id"]: c for c in cases}
    got: dict = {}
    for key, row in load_journal(out / "kvpress_answers.jsonl").items():
        k = json.loads(key)
        c = by_id.get(k["case"])
        if c is None or k["max_new_tokens"] != c["max_new_tokens"] or k["case_hash"] != ids_hash(c["ids"], len(c["ids"])):
            continue  # another case set, or the same id with a different prompt
        answer = tok.decode(row["new_ids"], skip_special_tokens=True)
        label = "dense" if row["method"] == "dense" else f"{row['method']}@{row['budget']}" if row["budget"] is not None else row["method"]
        got.setdefault(label, {})[k["case"]] = {**row, "answer": answer, "score": string_match_all(answer, by_id[k["case"]]["references"])}
    return got


def summarise(ours: dict, theirs: dict, cases: list, args) -> dict:
    """Per method: score [CI], paired vs graphwright's dense, bytes fraction; per ``--pair``: kvpress's best press at
that budget against the graphwright recipe."""
    from graphwright.eval.stats import bootstrap_mean, paired_difference

    order = [c["id"] for c in cases]
    dense = ours["dense"]

    def method(side, label, rows, dense_rows, bytes_key):
        ids = [i for i in order if i in rows and i in dense]
        if not ids:
            return None
        s = [rows[i]["score"] for i in ids]
        kv = sum(rows[i][bytes_key] for i in ids if i in dense_rows) / max(1, sum(dense_rows[i][bytes_key] for i in ids if i in dense_rows))
        r = {"side": side, "method": label, "n": len(ids), "score": bootstrap_mean(s), "kv_fraction": kv,
             "vs_dense": paired_difference([dense[i]["score"] for i in ids], s) if label != "dense" or side != "graphwright" else None}
        if side == "kvpress" and label != "dense":
            r["prompt_kept"] = sum(rows[i]["kept_tokens"] for i in ids) / sum(rows[i]["compressed_tokens"] for i in ids)
        return r

    kv_dense = theirs.get("dense", {})
    rows = [m for lab, rs in ours.items() if (m := method("graphwright", lab, rs, dense, "kv_bytes"))]
    rows += [m for lab, rs in theirs.items() if (m := method("kvpress", lab, rs, kv_dense, "cache_bytes"))]
    same = [i for i in order if i in dense and i in kv_dense]
    agree = {"n": len(same), "same_answer": sum(dense[i]["answer"].strip() == kv_dense[i]["answer"].strip() for i in same),
             "same_score": sum(dense[i]["score"] == kv_dense[i]["score"] for i in same)}
    verdicts = []
    for b, ours_label in args.pair:
        b = float(b)
        ours_label, mine, cells = pair_cells(ours, theirs, b, ours_label)
        if not mine or not cells:
            continue
        full, ids, fewer = common_cases(cells, mine, order)
        if not ids:
            continue
        best = max(full, key=lambda lab: (sum(cells[lab][i]["score"] for i in ids), lab))
        d = paired_difference([cells[best][i]["score"] for i in ids], [mine[i]["score"] for i in ids])
        verdicts.append({"budget": b, "ours": ours_label, "kvpress_best": best, "n": len(ids), "fewer_cases": fewer,
                         "ours_score": bootstrap_mean([mine[i]["score"] for i in ids]),
                         "kvpress_score": bootstrap_mean([cells[best][i]["score"] for i in ids]), "difference": d,
                         "verdict": "ahead" if d["lo"] > 0 else "behind" if d["hi"] < 0 else "level"})
    return {"length": args.length, "tasks": args.tasks, "cases": len(cases), "rows": rows, "dense_agreement": agree,
            "best_vs_best": verdicts}


def ci(m) -> str:
    return f"{m['mean']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"


def diff(m) -> str:
    return f"{m['mean']:+.2f} [{m['lo']:+.2f}, {m['hi']:+.2f}]"


def to_markdown(res: dict) -> str:
    lines = [f"RULER-style {', '.join(res['tasks'])} at {res['length']} tokens, seed 0, question-aware; graphwright rows from its "
             "journal, kvpress rows from `bench/kvpress_worker.py` on the same token ids; both scored with `string_match_all`.", "",
             "| side | method | cases | score [95% CI] | paired vs graphwright dense | KV held / own dense | prompt kept (kvpress) |",
             "|---|---|---:|---|---|---:|---:|"]
    for r in sorted(res["rows"], key=lambda r: (r["side"] != "graphwright", r["method"] != "dense", -r["score"]["mean"])):
        vs = diff(r["vs_dense"]) if r["vs_dense"] else ""
        kept = f"{r['prompt_kept']:.3f}" if "prompt_kept" in r else ""
        lines.append(f"| {r['side']} | `{r['method']}` | {r['n']} | {ci(r['score'])} | {vs} | {r['kv_fraction']:.3f} | {kept} |")
    a = res["dense_agreement"]
    lines += ["", f"Dense on both sides: the same answer text on {a['same_answer']} of {a['n']} cases, the same score on "
              f"{a['same_score']} of {a['n']}.", ""]
    if res["best_vs_best"]:
        lines += ["| kvpress budget | kvpress best press | its score | graphwright recipe | its score | graphwright - kvpress, paired | verdict |",
                  "|---:|---|---|---|---|---|---|"]
        for v in res["best_vs_best"]:
            lines.append(f"| {v['budget']} | `{v['kvpress_best']}` | {ci(v['kvpress_score'])} | `{v['ours']}` | {ci(v['ours_score'])} | "
                         f"{diff(v['difference'])} ({v['n']}) | **{v['verdict']}** |")
        fewer = sorted({f"`{lab}` ({n})" for v in res["best_vs_best"] for lab, n in v.get("fewer_cases", {}).items()})
        lines += ["", "kvpress's best press is picked on these very cases (a winner's curse in its favour)"
                  + (f"; not picked, run on fewer cases: {', '.join(fewer)}." if fewer else ".")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import kvpress_side_by_side as sbs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = (None, sbs.load_tokenizer(args.model)) if args.table_only else sbs.load(args.model)
    cases = build(tok, args)
    ours = our_rows(Path(args.journal), cases, args.model)
    if not args.table_only:
        run_worker(args, tok, model, cases, out)
    res = summarise(ours, kvpress_rows(out, cases, tok), cases, args)
    (out / "table.json").write_text(json.dumps(res, indent=2))
    (out / "table.md").write_text(to_markdown(res))
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
