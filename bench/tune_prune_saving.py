"""Wall time the first-window proxy pruning saves: the same small study with ``prune_margin`` on and off.

Usage:
    PYTHONPATH=. python bench/tune_prune_saving.py --recipe h2o --budget 0.9 --trials 4 --windows 2 --window 160 --prefix 128 \
        --niah-cases 1 --enqueue '{"0.h2o.heavy": 0.3, "0.h2o.recent": 0.05}' --enqueue '{"0.h2o.heavy": 0.05, "0.h2o.recent": 0.3}' \
        --out bench/results/tune/prune-saving

Runs ``graphwright.tune`` twice with the same seed, settings and initial design (``population = trials``: every
trial is ``--enqueue``d or drawn from the seeded design, so both runs run the same parameters), once with ``prune_margin`` off and
once on, in one process, and writes ``saving.json``: per run the wall time (the study's creation, i.e. capture
and the dense scores, included), the trial states and the rules that pruned, the windows and needle sets scored,
and per trial whether it ran in full. Timings on a shared machine are indicative only; the windows and needles not
scored are exact.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="h2o")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window", type=int, default=192)
    p.add_argument("--prefix", type=int, default=128)
    p.add_argument("--niah-cases", type=int, default=2)
    p.add_argument("--niah-length", type=int, default=256)
    p.add_argument("--enqueue", type=json.loads, action="append", default=None, metavar="JSON",
                   help="a point run first in both runs, {parameter: value} (repeatable); the seeded design fills the rest")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared machine)")
    p.add_argument("--order", default="on,off", help="which run first (on,off or off,on)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch

    from graphwright.models import load_model
    from graphwright.tuning.study import tune

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    ev = {"windows": args.windows, "window": args.window, "prefix": args.prefix, "niah_cases": args.niah_cases,
          "niah_length": args.niah_length}
    out = Path(args.out)
    runs = {}
    for which in args.order.split(","):
        t0 = time.perf_counter()
        r = tune(model, tok, template=args.recipe, budget=args.budget, trials=args.trials, population=args.trials, seed=0,
                 enqueue=args.enqueue,
                 eval_settings=ev, out=out / which, outputs=False, threads=args.threads, prune_margin=args.margin if which == "on" else None)
        wall = time.perf_counter() - t0
        trials = [{"number": t["number"], "recipe": t["recipe"], "state": t["state"], "pruned_by": t.get("pruned_by"),
                   "windows_scored": t.get("windows_scored"), "proxy_kv_fraction": t.get("proxy_kv_fraction"),
                   "proxy_ppl_ratio": t.get("proxy_ppl_ratio"), "ppl_ratio": t.get("ppl_ratio"), "niah": t.get("niah")}
                  for t in r["trials"]]
        runs[which] = {"wall_s": wall, "trials": trials, "windows_scored": sum(t["windows_scored"] or 0 for t in trials),
                       "needle_sets": sum(1 for t in trials if t["state"] == "COMPLETE")}
        print(f"prune {which}: {wall:.0f} s wall, states {[t['state'] for t in trials]}, pruned by "
              f"{[t['pruned_by'] for t in trials if t['pruned_by']]}", flush=True)
        (out / "saving.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
