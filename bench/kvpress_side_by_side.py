"""graphwright's KV-cache recipes side by side with NVIDIA kvpress's presses on the same needle cases.

Usage:
    bash bench/setup_kvpress.sh                        # once: kvpress in its own venv (bench/README-kvpress.md)
    python bench/kvpress_side_by_side.py --lengths 1024 2048 --cases 50 --out bench/results/kvpress
    python bench/kvpress_side_by_side.py --cases 10 --lengths 1024 --recipes "snapkv(budget={budget})" --presses SnapKV

Cases: ``graphwright.eval.niah.needle_suite`` (``--cases`` per length, depths 0..1, three needle templates,
two haystacks, question after the context), tokenised once here; both sides get the same token ids.
Budgets (``--budgets``, default 0.5 and 0.25) are fractions of the compressed tokens kept: graphwright recipes are
templates filled with ``{budget}`` (tokens = int(fraction x compressed tokens), kvpress's ``compute_n_kept``; compressed
tokens = the whole prompt question-aware, the context alone question-agnostic, as kvpress's ratio; before session 13
the agnostic budget was a fraction of the whole prompt, ``--agnostic-basis prompt``), ``{window}``
(budget - 4, for 4 sinks), ``{frac}`` and ``{half}`` (fraction / 2); a template without a field is one fixed
setting, run once (budget None; its bytes say where it stands); kvpress gets ``compression_ratio =
1 - fraction``. The kvpress side runs in a subprocess of ``bench/.venv-kvpress`` (``bench/kvpress_worker.py``)
on the very same weights, written once as a safetensors folder (``save_pretrained`` of the model graphwright
loaded). Modes: ``aware`` compresses the whole prompt (question included; a snapkv observation window then covers
the question); ``agnostic`` compresses the context only (kvpress's ``question=``; graphwright's ``cm.prefill(context)``
then ``cm.generate(question, context=ctx)``).

Reported per side, method, mode and budget (``kvpress_report``): needle accuracy with a seeded 95% bootstrap
interval, the paired difference from the same side's dense run on the same cases, and the cache bytes held
after the compression step: kvpress, the storage bytes of every tensor in its cache object (masking presses
show dense bytes); graphwright, ``cm.last_stats`` after a prefill-only generate (``kv_storage_bytes`` where
the runtime reports it, else ``kv_bytes``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_RECIPES = ["snapkv(budget={budget})", "h2o(heavy={half}, recent={half})", "streaming(sinks=4, window={window})"]
DEFAULT_PRESSES = ["SnapKV", "ObservedAttention", "ExpectedAttention", "TOVA", "Knorm", "KeyDiff", "StreamingLLM", "KeyRerotation(StreamingLLM)",
                   "AdaKV(SnapKV)", "ChunkKV(SnapKV)", "PyramidKV", "CriticalKV(SnapKV)",
                   "CriticalAdaKV(SnapKV)", "DuoAttention", "DuoAttention(graphwright heads)"]
MODES = ("aware", "agnostic")
KVPRESS_PY = HERE / ".venv-kvpress" / "bin" / "python"
SETUP = ("the kvpress side needs its own environment {py} (kvpress 0.5.5, CPU torch; never a graphwright dependency).\n"
         "Create it with:  bash bench/setup_kvpress.sh   (see bench/README-kvpress.md)\n"
         "or pass --kvpress-python PATH, or --skip-kvpress to run the graphwright side only.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048], help="needle prompt lengths (tokens)")
    p.add_argument("--cases", type=int, default=50, help="needle cases per length")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25], help="fractions of the prompt the cache keeps")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES,
                   help="graphwright recipe templates ({budget} tokens, {window} = budget - 4, {frac}, {half} = frac / 2, "
                        "{question} = the case's tokens after the context)")
    p.add_argument("--presses", nargs="+", default=DEFAULT_PRESSES, help="kvpress presses")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="compression modes, both sides (agnostic: the context is compressed alone, then the question is fed)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "kvpress"), help="folder for cases.json, results JSON/markdown/plot")
    p.add_argument("--model-dir", default=None, help="safetensors folder for the kvpress side (default: bench/.cache-kvpress/MODEL)")
    p.add_argument("--kvpress-python", default=str(KVPRESS_PY), help="python of the kvpress environment")
    p.add_argument("--skip-kvpress", action="store_true", help="run the graphwright side only")
    p.add_argument("--skip-graphwright", action="store_true",
                   help="run the kvpress side only (the table still shows the graphwright answers the journal holds)")
    p.add_argument("--journal", default=None, help="graphwright's answers, JSONL (default OUT/graphwright_answers.jsonl)")
    p.add_argument("--import-suite", default=None, metavar="JOURNAL",
                   help="a long-suite journal (bench/results/suite/cases.jsonl): graphwright's aware answers it holds for the "
                        "same recipe and prompt are copied, not generated (bytes are still measured here)")
    p.add_argument("--table-only", action="store_true",
                   help="rebuild the table from OUT/cases.json and the journals in OUT; load no weights, run nothing")
    p.add_argument("--first", type=int, default=None,
                   help="answer only the first N cases of each length in spread order (of 50: 0, 10, 20, 30, 40, 5, 15, ..., 45, 2, 12, ...: "
                        "every prefix spans the depths; kvpress_specs.py uses the same order); the journals resume, the table covers what they hold")
    p.add_argument("--round", type=int, default=None,
                   help="graphwright's side answers R cases of each length (in spread order, as --first) for every recipe in turn "
                        "(cells grow together)")
    p.add_argument("--agnostic-basis", default="context", choices=("context", "prompt"),
                   help="question-agnostic {budget}: a fraction of the context (kvpress's basis: its ratio applies to what it "
                        "compresses) or of the whole prompt (sessions 9-12); the table shows the answers of this basis")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    if a.round is not None and a.round < 1:
        p.error(f"--round must be >= 1; got {a.round}")
    if a.first is not None and a.first < 1:
        p.error(f"--first must be >= 1; got {a.first}")
    check_budgets_and_cases(p, a)
    return a


def check_budgets_and_cases(p, a) -> None:
    """``--budgets`` in (0, 1) and ``--cases`` >= 1, or the parser's error (this script's and ``kvpress_ruler.py``'s)."""
    bad = [b for b in a.budgets if not 0.0 < b < 1.0]
    if bad:
        p.error(f"--budgets are fractions of the prompt kept, in (0, 1); got {bad}")
    if a.cases < 1:
        p.error(f"--cases must be >= 1; got {a.cases}")


def budget_tokens(frac: float, tokens: int) -> int:
    """Tokens kept per head at budget fraction ``frac`` of ``tokens`` compressed tokens: kvpress's own count
    (``kvpress.utils.compute_n_kept(tokens, 1 - frac)`` = max(1, int(tokens x (1 - (1 - frac))))), so both sides keep
    the same number (at 1,024 and 2,048 tokens, 50% and 25%, it is round(frac x tokens) too)."""
    return max(1, int(tokens * (1.0 - (1.0 - frac))))


def fill(template: str, frac: float, tokens: int, question: int | None = None) -> str:
    """A recipe template filled for one budget fraction and a number of compressed tokens (the whole prompt
    question-aware, the context alone question-agnostic: kvpress applies its ratio to what it compresses);
    ``{question}``: the case's question tokens (the prompt after the context: Finch's window, ``question``)."""
    budget = budget_tokens(frac, tokens)
    if "{question}" in template and question is None:
        raise SystemExit(f"recipe template {template!r} uses {{question}}, which only a case fills (its tokens after the context)")
    try:
        return template.format(budget=budget, window=max(1, budget - 4), frac=f"{frac:g}", half=f"{frac / 2:g}", question=question)
    except (KeyError, IndexError) as exc:
        raise SystemExit(f"recipe template {template!r} uses an unknown field {exc}; allowed: {{budget}}, {{window}}, {{frac}}, "
                         "{half}, {question}") from None


SPREAD = (0, 5, 2, 7, 4, 9, 1, 6, 3, 8)  # residues mod 10, in the order the spread order takes them


def spread(cases: list) -> list:
    """One length's cases (in depth order) reordered so that every prefix spans the depths: case i sorted by
    (position of i mod 10 in ``SPREAD``, i). Of 50 cases: 0, 10, 20, 30, 40, then 5, 15, ..., 45, then 2, 12, ..."""
    return [cases[i] for i in sorted(range(len(cases)), key=lambda i: (SPREAD.index(i % 10), i))]


def load(model_name):
    from graphwright.eval.bytetok import ByteTokenizer
    from graphwright.models import load_model

    model, tok = load_model(model_name)
    return model, tok if tok is not None else ByteTokenizer()


def load_tokenizer(model_name):
    """The tokenizer alone (a real model's converted folder, no weights loaded), for ``--table-only``."""
    from graphwright.models.load import REAL_MODELS

    if model_name in REAL_MODELS:
        from transformers import AutoTokenizer

        from graphwright.models.smollm2 import converted_folder

        return AutoTokenizer.from_pretrained(converted_folder())
    return load(model_name)[1]


def build_cases(tok, lengths, cases, seed):
    """Needle cases as plain data plus the prompt token ids and where the context ends (the agnostic split)."""
    from graphwright.eval.niah import encode, needle_suite

    out = []
    for c in needle_suite(tok, lengths=lengths, cases=cases, seed=seed):
        ids = list(encode(tok, c["prompt"]).input_ids)
        out.append({k: c[k] for k in ("id", "length", "depth", "city", "activity", "template", "haystack")}
                   | {"ids": ids, "split": int(c["context_span"][1])})
    return out


def save_model_dir(model, tok, folder: Path) -> Path:
    """The loaded weights as a Hugging Face safetensors folder (written once), for the kvpress side."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(folder)
    # the GGUF conversion leaves "quantization_config": null, which kvpress's older transformers cannot read
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "quantization_config" in cfg and cfg["quantization_config"] is None:
        del cfg["quantization_config"]
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def our_key(model_name, recipe, mode, case, seed, max_new_tokens):
    """The graphwright journal key of one side-by-side answer (``graphwright.eval.journal``)."""
    from graphwright.eval.journal import case_hash, make_key

    return make_key(model_name, "dense" if recipe == "noop" else recipe, mode, "niah", case["length"], case["id"], seed,
                    case_hash(case["ids"], [case["activity"], case["split"]]),
                    {"max_new_tokens": max_new_tokens, "runner": "kvpress_side_by_side", "backend": "torch"})


def suite_key(model_name, recipe, case, seed, max_new_tokens):
    """The long suite's journal key (``graphwright.eval.suite``, needle task, torch backend) of one aware answer.

    Its case hash covers the token ids and the needle's activity: a key that matches is the very same prompt."""
    from graphwright.eval.journal import case_hash, make_key
    from graphwright.eval.suite import canonical

    return make_key(model_name, canonical(recipe), "aware", "niah", case["length"], case["id"], seed,
                    case_hash(case["ids"], case["activity"]), {"max_new_tokens": max_new_tokens, "backend": "torch"})


@torch.inference_mode()
def run_ours(model, tok, cases, recipes, budgets, max_new_tokens, progress=False, modes=("aware",), journal=None,
             model_name="model", seed=0, suite=None, round_size=None, agnostic_basis="context"):
    """Rows ``{method, recipe, budget, mode, id, new_ids, cache_bytes}`` for dense and every recipe x budget x length.

    Every answer is appended at once to ``journal`` (a ``graphwright.eval.journal.Journal``; in memory when None)
    and answers it already holds are not computed again (a recipe whose cases are all there is not even compiled).
    ``suite`` (a long-suite journal, ``--import-suite``): an aware answer it holds for the same recipe and the same
    prompt (its key's case hash covers the token ids) is copied instead of generated, as ``answer`` (decoded text;
    the suite keeps no token ids) with ``source: "suite"``. Bytes held after prefill are measured here once per recipe
    and prompt length (one prefill-only generate), or taken from a journal row of the same recipe, length and prompt
    token count that measured them. ``round_size`` R: the cases of each length are answered R at a time for every
    recipe in turn (cells grow together; each recipe is compiled once and kept). ``agnostic_basis``: question-agnostic
    templates are filled from the case's context length (``"context"``, kvpress's basis; the row records
    ``"basis": "context"``) or from the prompt length (``"prompt"``, the rows of sessions 9-12, which carry no basis)."""
    from graphwright.capture import capture
    from graphwright.compiled import CompiledModel
    from graphwright.eval.journal import Journal
    from graphwright.verify import run_recipe

    jr = journal if journal is not None else Journal()
    sg = None
    eos = tok.eos_token_id
    lengths = sorted({c["length"] for c in cases})
    # a template without a {field} is one fixed setting: it runs once, with budget None
    jobs = [("dense", None)] + [(t, b) for t in recipes for b in (budgets if "{" in t else [None])]
    our_modes = [m for m in ("aware", "agnostic") if m in modes]
    rows, bytes_key, cms, held_by = [], None, {}, {}

    def compiled(recipe):
        nonlocal sg
        if recipe not in cms:
            sg = sg if sg is not None else capture(model)
            new, parsed, _ = run_recipe(sg, recipe, model=model, tokenizer=tok, verify=False)
            cms[recipe] = CompiledModel(new, tokenizer=tok, recipe=parsed)
        return cms[recipe]

    def held_bytes(recipe, length, ids, memo=None):
        """(bytes held after prefill, which stat) for this recipe at this prompt length: from the journal or one prefill."""
        if (memo or recipe, length) not in held_by:
            known = [row for key, row in jr.records() if key.get("recipe") == ("dense" if recipe == "noop" else recipe)
                     and key.get("model") == model_name and key.get("length") == length and row.get("mode", "aware") == "aware"
                     and "cache_bytes" in row and row.get("prompt_tokens") == len(ids)]
            if known:
                held_by[(memo or recipe, length)] = int(known[0]["cache_bytes"]), known[0]["bytes_key"]
            else:
                cm = compiled(recipe)
                # bytes held after the prefill step: a generate that stops at its first token runs no decode step
                cm.generate(torch.tensor([ids]), max_new_tokens=1, eos_token_id=eos, pad_token_id=eos, allow_long=True)
                bk = "kv_storage_bytes" if "kv_storage_bytes" in cm.last_stats else "kv_bytes"
                held_by[(memo or recipe, length)] = int(cm.last_stats[bk]), bk
        return held_by[(memo or recipe, length)]

    per_length = {length: [c for c in cases if c["length"] == length] for length in lengths}
    step = round_size or max(len(v) for v in per_length.values())
    n_rounds = -(-max(len(v) for v in per_length.values()) // step)
    for rnd in range(n_rounds):
        for template, frac in jobs:
            t0, ran = time.perf_counter(), 0
            for length in lengths:
                picked = per_length[length][rnd * step:(rnd + 1) * step]
                for c in picked:
                    ids = torch.tensor([c["ids"]])
                    for mode in our_modes:
                        by_context = mode == "agnostic" and frac is not None and agnostic_basis == "context"
                        recipe = "noop" if template == "dense" else \
                            (template if frac is None else fill(template, frac, c["split"] if by_context else length,
                                                                              len(c["ids"]) - c["split"]))
                        # a {question} recipe (Finch's window) holds the same bytes for every window: measured once
                        memo = (template, frac) if "{question}" in template else None
                        key = our_key(model_name, recipe, mode, c, seed, max_new_tokens)
                        if jr.get(key) is None:
                            held, bk = held_bytes(recipe, length, per_length[length][0]["ids"], memo) if mode == "aware" else (None, None)
                            imported = suite.get(suite_key(model_name, recipe, c, seed, max_new_tokens)) \
                                if suite is not None and mode == "aware" else None
                            if imported is not None:
                                jr.add(key, {"method": template, "recipe": recipe, "budget": frac, "mode": mode, "id": c["id"],
                                             "answer": imported["answer"], "source": "suite", "cache_bytes": held, "bytes_key": bk,
                                             "prompt_tokens": len(c["ids"])})
                            else:
                                cm = compiled(recipe)
                                if mode == "aware":
                                    out = cm.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                                                      allow_long=True)
                                    new_ids, nbytes = out[0, ids.shape[1]:].tolist(), held
                                else:  # compress the context alone (cm.prefill), then the question continues it
                                    ctx = cm.prefill(ids[:, :c["split"]], allow_long=True)
                                    bk = "kv_storage_bytes" if "kv_storage_bytes" in cm.last_stats else "kv_bytes"
                                    nbytes = int(cm.last_stats[bk])
                                    q = ids[:, c["split"]:]
                                    out = cm.generate(q, context=ctx, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                                      pad_token_id=eos, allow_long=True)
                                    new_ids = out[0, q.shape[1]:].tolist()
                                jr.add(key, {"method": template, "recipe": recipe, "budget": frac, "mode": mode, "id": c["id"],
                                             "new_ids": new_ids, "cache_bytes": nbytes, "bytes_key": bk, "prompt_tokens": len(c["ids"])}
                                       | ({"basis": "context"} if by_context else {}))
                                ran += 1
                        row = jr.get(key)
                        bytes_key = row.get("bytes_key", bytes_key)
                        rows.append({k: v for k, v in row.items() if k != "bytes_key"} | {"method": template, "budget": frac})
            if progress:
                print(f"graphwright {template} budget={frac} round {rnd + 1}/{n_rounds}: {ran} answers generated in "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows, bytes_key


def duo_headset(model_name) -> Path:
    """graphwright's shipped DuoAttention head set for ``model_name`` (the press "DuoAttention(graphwright heads)" reads it)."""
    import graphwright.heads.headsets as hs

    return Path(hs.__file__).parent / f"{model_name}_duo.json"


def qfilters_file(model_name, model, tok, folder: Path = HERE / "results" / "kvpress") -> Path:
    """graphwright's calibrated Q-Filters for ``model_name`` as a safetensors file (written once; the press
    "QFilter(graphwright filters)" reads it): what ``evict(score='qfilter')`` computes when it is given no file."""
    path = Path(folder) / f"qfilters-{model_name}.safetensors"
    if not path.is_file():
        from graphwright.capture import capture
        from graphwright.passes.pipeline import make_context
        from graphwright.passes.qfilter_calibrate import calibrate_filters, save_filters

        path.parent.mkdir(parents=True, exist_ok=True)
        save_filters(path, calibrate_filters(capture(model), make_context(model, tok)))
    return path


def run_kvpress(args, cases, write_model, eos, out: Path, qfilters=None) -> dict:
    """The kvpress side in its own environment; ``{"skipped": reason}`` when that environment is missing.

    ``write_model()`` returns the safetensors folder (written only when the environment exists). The worker
    appends every answer to ``out/kvpress_answers.jsonl`` and skips the answers already there."""
    py = Path(args.kvpress_python)
    if not py.is_file():
        msg = SETUP.format(py=py)
        print(f"kvpress side skipped: {msg}", file=sys.stderr, flush=True)
        return {"skipped": msg}
    spec = {"model": args.model, "model_dir": str(write_model()), "presses": args.presses, "budgets": args.budgets,
            "modes": args.modes, "max_new_tokens": args.max_new_tokens, "eos": [eos] if isinstance(eos, int) else list(eos),
            "journal": str(out / "kvpress_answers.jsonl"), "duo_headset": str(duo_headset(args.model)),
            "qfilters": str(qfilters()) if qfilters is not None and "QFilter(graphwright filters)" in args.presses else None,
            "cases": [{"id": c["id"], "ids": c["ids"], "split": c["split"]} for c in cases]}
    spec_path, res_path = out / "kvpress_cases.json", out / "kvpress_raw.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([str(py), str(HERE / "kvpress_worker.py"), str(spec_path), str(res_path)], check=True)
    return json.loads(res_path.read_text())


def _basis(row) -> str:
    """What a journal row's ``{budget}`` is a fraction of: ``"aware"`` (the whole prompt, question-aware, and every
    fixed recipe), ``"context"`` (agnostic, session 13 on) or ``"prompt"`` (agnostic rows of sessions 9-12, no field)."""
    if row.get("mode", "aware") == "aware" or row.get("budget") is None:
        return "aware"
    return row.get("basis", "prompt")


def journal_rows(jr, cases, args) -> tuple:
    """Every graphwright answer the journal holds for these cases (any recipe), as ``run_ours`` rows.

    A row counts when its key is the one ``our_key`` gives its recipe on that case today: the same prompt hash, seed,
    model, version and settings, with the head-set files the recipe reads now (``settings["headsets"]``; a row
    answered with an earlier shipped head set is another method's and is left out)."""
    from graphwright.eval.journal import headsets_read

    fields = ("case", "case_hash", "settings", "version", "seed", "model")
    want = {c["id"]: our_key(args.model, "dense", "aware", c, args.seed, args.max_new_tokens) for c in cases}  # no head sets
    headsets: dict = {}  # recipe -> the head-set files it reads today, hashed once per recipe
    rows, bytes_key = [], None
    for key, row in jr.records():
        base = want.get(key["case"])
        if base is None:
            continue
        if key["recipe"] not in headsets:
            headsets[key["recipe"]] = headsets_read(args.model, key["recipe"])
        expect = {**base, "settings": {**base["settings"], "headsets": headsets[key["recipe"]]}} if headsets[key["recipe"]] else base
        if all(key[f] == expect[f] for f in fields) and _basis(row) in ("aware", args.agnostic_basis):
            rows.append({f: v for f, v in row.items() if f != "bytes_key"})
            bytes_key = row.get("bytes_key", bytes_key)
    return rows, bytes_key


def kvpress_journal_rows(path, cases, args) -> list:
    """Every kvpress answer the worker's journal holds for these cases (any press, budget, mode), in file order.

    ``path`` is one journal or a folder: there, ``kvpress_answers.jsonl`` and every ``kvpress_answers.*.jsonl`` (journals of
    workers run side by side on one press each), merged by key (the first file holding a key wins)."""
    from kvpress_worker import case_key, load_journal

    path = Path(path)
    files = [path] if not path.is_dir() else [f for f in [path / "kvpress_answers.jsonl"] + sorted(path.glob("kvpress_answers.*.jsonl"))
                                             if f.is_file()]
    merged: dict = {}
    for f in files:
        for k, r in load_journal(f).items():
            merged.setdefault(k, r)
    want = {}
    for c in cases:
        k = json.loads(case_key({"model": args.model, "model_dir": "", "max_new_tokens": args.max_new_tokens}, c, "", None, "", ""))
        want[(c["id"], k["case_hash"])] = c
    return [row for key, row in ((json.loads(k), r) for k, r in merged.items())
            if (key["case"], key["case_hash"]) in want and key["model"] == args.model and key["max_new_tokens"] == args.max_new_tokens]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from graphwright.eval.journal import Journal

    jr = Journal(args.journal or out / "graphwright_answers.jsonl")
    if args.table_only:
        if not (out / "cases.json").is_file():
            raise SystemExit(f"--table-only needs {out / 'cases.json'} (written by a run with the same --out)")
        tok, cases = load_tokenizer(args.model), json.loads((out / "cases.json").read_text())
        args.lengths = sorted({c["length"] for c in cases})
        args.cases = len(cases) // len(args.lengths)
        args.skip_graphwright = args.skip_kvpress = True
        ours, bytes_key = journal_rows(jr, cases, args)
        kv = {"skipped": "--table-only (the table shows what the journals hold)"}
        return _report(args, out, tok, cases, ours, bytes_key, kv, t0)
    model, tok = load(args.model)
    cases = build_cases(tok, args.lengths, args.cases, args.seed)
    (out / "cases.json").write_text(json.dumps(cases))
    # the graphwright side answers what the journal lacks; with --skip-graphwright only what it holds is shown
    if args.import_suite and not Path(args.import_suite).is_file():
        raise SystemExit(f"--import-suite {args.import_suite}: no such journal (the long suite's cases.jsonl)")
    suite = Journal(args.import_suite) if args.import_suite else None
    todo = cases if args.first is None and args.round is None else \
        [c for length in args.lengths for c in spread([c for c in cases if c["length"] == length])[:args.first]]
    ours, bytes_key = run_ours(model, tok, todo, [] if args.skip_graphwright else args.recipes, args.budgets,
                               args.max_new_tokens, args.progress, args.modes, journal=jr, model_name=args.model, seed=args.seed,
                               suite=suite, round_size=args.round, agnostic_basis=args.agnostic_basis)
    if args.skip_graphwright:
        ours, bytes_key = journal_rows(jr, cases, args)
    if args.skip_kvpress:
        kv = {"skipped": "--skip-kvpress"}
    else:
        model_dir = Path(args.model_dir) if args.model_dir else HERE / ".cache-kvpress" / args.model
        kv = run_kvpress(args, cases, lambda: save_model_dir(model, tok, model_dir), tok.eos_token_id, out,
                         qfilters=lambda: qfilters_file(args.model, model, tok))
    return _report(args, out, tok, cases, ours, bytes_key, kv, t0)


def _report(args, out, tok, cases, ours, bytes_key, kv, t0) -> int:
    from kvpress_report import score_rows, summarise, write_report

    kv_rows = kvpress_journal_rows(out, cases, args)  # whatever the journals hold, also with --skip-kvpress
    raw = {"graphwright": score_rows(ours, cases, tok), "kvpress": score_rows(kv_rows, cases, tok)}
    print(f"graphwright answers: {len(ours)}; kvpress answers: {len(kv_rows)}", file=sys.stderr, flush=True)
    settings = {"model": args.model, "lengths": args.lengths, "cases_per_length": args.cases, "budgets": args.budgets,
                "recipes": args.recipes, "presses": args.presses, "modes": args.modes, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "graphwright_bytes": bytes_key, "kvpress_versions": kv.get("versions"),
                "kvpress_errors": kv.get("errors", {}), "kvpress_skipped": kv.get("skipped")}
    if args.table_only:  # what the journals hold, not what this invocation was asked for
        settings |= {"recipes": sorted({r["method"] for r in ours} - {"dense"}), "presses": sorted({r["method"] for r in kv_rows} - {"dense"}),
                     "budgets": sorted({r["budget"] for r in ours + kv_rows if r["budget"] is not None})}
    result = {"settings": settings, "rows": summarise(raw, args.seed), "raw": raw, "seconds": time.perf_counter() - t0}
    for path in write_report(result, out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
