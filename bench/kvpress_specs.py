"""Write one kvpress worker spec per press, for running ``bench/kvpress_worker.py`` processes side by side.

Usage:
    python bench/kvpress_specs.py --lengths 1024 --cases 50 --presses SnapKV StreamingLLM --budgets 0.5 0.25 \
        --out bench/results/kvpress
    nice -n 10 env OMP_NUM_THREADS=1 bench/.venv-kvpress/bin/python bench/kvpress_worker.py \
        bench/.cache-kvpress/specs/SnapKV.json /tmp/SnapKV.out.json

Writes ``OUT/cases.json`` (as ``kvpress_side_by_side.py`` does), the safetensors folder of the weights (once) and
``bench/.cache-kvpress/specs/<press>.json`` (``--specs``): the same cases and settings as
``kvpress_side_by_side.run_kvpress`` would pass, but one press per spec and journal (``OUT/kvpress_answers.<press>.jsonl``,
which the table merges). The cases are in spread order (``kvpress_side_by_side.spread``: of 50 cases 0, 10, 20, 30, 40,
then 5, 15, ..., 45, then 2, 12, ...; every prefix of 5 spans the depths 0..1); ``--first N`` puts only the first N of
each length in the specs (the journals resume, so a later spec with more cases answers only the new ones).
``--spec NAME`` writes one spec (one worker, one journal) with every press in the order given, and ``--round R`` makes
that worker answer R cases for every press and budget in turn. The dense run goes to a spec whose presses include
``dense``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def slug(press: str) -> str:
    """A file-name-safe press name: ``AdaKV(SnapKV)`` -> ``AdaKV-SnapKV``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", press).strip("-")


def main(argv=None) -> int:
    import kvpress_side_by_side as sbs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024])
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--first", type=int, default=None, help="only the first N cases of each length (in spread order) in the specs")
    p.add_argument("--round", type=int, default=None,
                   help="the worker answers R cases for every press and budget in turn (cells grow together)")
    p.add_argument("--spec", default=None, help="one spec with every press (in the order given) under this name")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--presses", nargs="+", required=True, help="kvpress presses, or 'dense' for the dense run alone")
    p.add_argument("--modes", nargs="+", default=["aware"], choices=sbs.MODES)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "kvpress"))
    p.add_argument("--model-dir", default=None)
    p.add_argument("--specs", default=str(HERE / ".cache-kvpress" / "specs"),
                   help="folder for the spec files (git-ignored by default: they hold absolute paths)")
    a = p.parse_args(argv)
    bad = [b for b in a.budgets if not 0.0 < b < 1.0]
    if bad:
        p.error(f"--budgets are fractions of the prompt kept, in (0, 1); got {bad}")
    if a.first is not None and a.first < 1:
        p.error(f"--first must be >= 1; got {a.first}")
    out = Path(a.out)
    specs = Path(a.specs)
    specs.mkdir(parents=True, exist_ok=True)
    model, tok = sbs.load(a.model)
    cases = sbs.build_cases(tok, a.lengths, a.cases, a.seed)
    (out / "cases.json").write_text(json.dumps(cases))
    model_dir = sbs.save_model_dir(model, tok, Path(a.model_dir) if a.model_dir else HERE / ".cache-kvpress" / a.model)
    picked = [c for length in a.lengths for c in sbs.spread([c for c in cases if c["length"] == length])[:a.first]]
    eos = tok.eos_token_id
    groups = [a.presses] if a.spec else [[press] for press in a.presses]
    for presses in groups:
        name = a.spec or presses[0]
        dense = "dense" in presses
        spec = {"model": a.model, "model_dir": str(model_dir), "presses": [p for p in presses if p != "dense"], "budgets": a.budgets,
                "modes": a.modes, "max_new_tokens": a.max_new_tokens, "eos": [eos] if isinstance(eos, int) else list(eos),
                "journal": str(out / f"kvpress_answers.{slug(name)}.jsonl"), "round": a.round, "duo_headset": str(sbs.duo_headset(a.model)),
                "qfilters": str(sbs.qfilters_file(a.model, model, tok)), "dense": dense,
                "cases": [{"id": c["id"], "ids": c["ids"], "split": c["split"]} for c in picked]}
        path = specs / f"{slug(name)}.json"
        path.write_text(json.dumps(spec))
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
