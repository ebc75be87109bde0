"""``graphwright tune``: search a recipe template's tunable settings under a KV budget (Optuna NSGA-II).

``graphwright tune --model M --recipe "snapkv" --kv-budget 0.25 --trials N --workers K --out DIR``
searches the arguments the template leaves unset that its passes declare tunable
(``graphwright.tuning.space``), scoring each trial by KV bytes held and streamed perplexity on the
calibration split, and writes the Pareto front (pareto.json/.md/.png, recipes/trial-N.toml), the
winner re-measured on the held-out split (winner.json) and its report (winner_report.txt).
``--resume`` continues the study in ``--out`` with ``--trials`` more trials. ``--scheduler tcp://HOST:PORT``
runs the trials on a Dask cluster (``graphwright.tuning.cluster``), ``--storage URL`` puts the study in a
database (or a journal file) every worker reaches.
"""

from __future__ import annotations

from pathlib import Path

from ..tuning.report import WINNER_RULES
from .common import console, float_arg, int_arg, out_dir


def add_parser(sub):
    from ..codegen.backends import BACKENDS

    p = sub.add_parser("tune", help="search recipe settings under a KV budget (Pareto front of KV bytes vs perplexity)",
                       description="Multi-objective search (Optuna NSGA-II) over a recipe template's tunable arguments.")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, HF folder or .gguf file (default: smollm2-135m)")
    p.add_argument("--recipe", default="snapkv",
                   help='template: the passes to tune; arguments it sets are fixed, the rest of their tunables searched (default: snapkv)')
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="kernels for the graph's ops")
    p.add_argument("--kv-budget", type=float_arg(0, 1, lo_open=True), default=0.5, help="largest KV fraction (bytes held / dense) allowed")
    p.add_argument("--trials", type=int_arg(1, 100_000), default=16, help="trials this call runs")
    p.add_argument("--workers", type=int_arg(1, 64), default=1, help="local worker processes sharing the study's journal file")
    p.add_argument("--scheduler", default=None,
                   help="Dask scheduler address (tcp://HOST:PORT): run each trial as a task on that cluster "
                        "(pip install 'graphwright[cluster]'; pair with --storage every worker reaches)")
    p.add_argument("--storage", default=None,
                   help="where the study lives: a database URL (sqlite:///study.db, postgresql://...) or an Optuna journal file "
                        "path (default: --out/study.journal)")
    p.add_argument("--population", type=int_arg(2, 10_000), default=8, help="NSGA-II population (and the seeded initial design's size)")
    p.add_argument("--seed", type=int_arg(0, 2**31 - 1), default=0)
    p.add_argument("--windows", type=int_arg(1, 1_000), default=2, help="calibration (and held-out) perplexity windows")
    p.add_argument("--window", type=int_arg(4, 1_000_000), default=256, help="tokens per window")
    p.add_argument("--prefix", type=int_arg(1, 1_000_000), default=128, help="tokens prefilled per window; the rest scored by decode steps")
    p.add_argument("--niah-cases", type=int_arg(0, 10_000), default=0, help="short needle cases per trial (0: perplexity only)")
    p.add_argument("--niah-length", type=int_arg(16, 1_000_000), default=256, help="needle prompt length in tokens")
    p.add_argument("--max-ppl-ratio", type=float_arg(1, 1e6), default=None,
                   help="prune a trial whose perplexity ratio after the first window exceeds this")
    p.add_argument("--max-ppl-delta", type=float_arg(0, 1e6), default=None,
                   help="perplexity-aware quality: a trial whose calibration perplexity is more than this fraction above dense "
                        "(0.05 = 5%%) is infeasible (a constraint the search and the front respect; with --niah-cases and "
                        "--winner niah: the most needles within that perplexity)")
    p.add_argument("--scope", choices=("model", "layer", "head"), default="model",
                   help="model: one value per tunable argument; layer: eviction budgets, lowrank_kv keeps and streaming windows "
                        "per layer; head: duo's retrieval choice per (layer, KV head)")
    p.add_argument("--max-predicted-ppl", type=float_arg(1, 1e6), default=None,
                   help="prune, before it runs, a trial whose perplexity ratio the per-layer sensitivity proxy (measured once "
                        "per study) predicts above this; needs --scope layer (default off)")
    p.add_argument("--objectives", type=objectives_arg, default=("kv", "ppl"),
                   help="comma-separated: kv,ppl (always) and speed (decode tokens/s / dense, maximised); default kv,ppl")
    p.add_argument("--min-speed", type=float_arg(0, 1e6, lo_open=True), default=None,
                   help="speed floor: decode tokens/s ratio to dense (measured in the worker, alternating dense and candidate; "
                        "noisy on a shared machine), a constraint")
    p.add_argument("--speed-steps", type=int_arg(1, 100_000), default=16, help="decode steps per speed measure")
    p.add_argument("--speed-rounds", type=int_arg(1, 1_000), default=3, help="alternating dense/candidate speed rounds (median ratio)")
    p.add_argument("--prune-margin", type=float_arg(0, 1e6), default=None,
                   help="prune a trial whose first-window perplexity ratio is this fraction worse than an earlier trial's at "
                        "no more KV (e.g. 0.1; default off); a trial waits for the earlier trials' first windows, so "
                        "--workers K prunes what a serial run prunes")
    p.add_argument("--enqueue", type=enqueue_arg, action="append", default=None, metavar="JSON",
                   help='a point run first, as JSON {parameter: value} with the study\'s parameter names (e.g. '
                        '\'{"0.duo.retrieval": 0.25, "0.duo.window": 256}\'); repeat for several (known-good settings seed the search)')
    p.add_argument("--winner", choices=WINNER_RULES, default="ppl",
                   help="which Pareto point is the winner re-measured on the held-out split: ppl = lowest perplexity ratio "
                        "(default); niah = most calibration needles found (then lowest perplexity ratio; needs --niah-cases); "
                        "niah+ppl = most needles among points within --winner-ppl-cap, else lowest perplexity ratio")
    p.add_argument("--winner-ppl-cap", type=float_arg(1.0, 1e6, lo_open=True), default=None,
                   help="with --winner niah+ppl: the largest calibration perplexity ratio (to dense) the needle winner may have "
                        "(default 1.05)")
    p.add_argument("--threads", type=int_arg(1, 1_024), default=None, help="torch threads per worker (default: torch's own)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out")
    p.add_argument("--out", type=out_dir, default="results/tune", help="folder for the study journal and the outputs")


def enqueue_arg(text: str) -> dict:
    """``--enqueue '{"0.snapkv.budget": 256}'`` -> a dict; argparse's error says what is expected."""
    import argparse
    import json

    try:
        point = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--enqueue takes a JSON object {{parameter name: value}}; {text!r} is not JSON ({exc})") from None
    if not isinstance(point, dict) or not point:
        raise argparse.ArgumentTypeError(f"--enqueue takes a non-empty JSON object {{parameter name: value}}; got {text!r}")
    return point


def objectives_arg(text: str) -> tuple:
    """``kv,ppl[,speed]`` -> a tuple; argparse's error names what is allowed."""
    import argparse

    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not ({"kv", "ppl"} <= set(items) <= {"kv", "ppl", "speed"}) or len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"objectives must list kv and ppl and may add speed, comma-separated (e.g. kv,ppl,speed); got {text!r}")
    return items


def run(args):
    import graphwright as gw

    from ..tuning.study import tune

    if args.prefix > args.window - 2:
        raise ValueError(f"--prefix must be at most --window - 2 = {args.window - 2} so decode steps are scored; got {args.prefix}")
    model, tok = gw.load_model(args.model)
    if tok is None:
        from ..eval.bytetok import ByteTokenizer

        tok = ByteTokenizer()
        console.print(f"[dim]{args.model} ships no tokenizer: using bytes (graphwright.eval.bytetok)[/]")
    by_name = args.workers > 1 or args.scheduler is not None  # each worker loads the model itself
    result = tune(args.model if by_name else model, tok, template=args.recipe, budget=args.kv_budget, trials=args.trials,
                  workers=args.workers, out=args.out, seed=args.seed, resume=args.resume, population=args.population,
                  max_ppl_ratio=args.max_ppl_ratio, backend=args.backend, threads=args.threads, scope=args.scope,
                  objectives=args.objectives, min_speed=args.min_speed, speed_steps=args.speed_steps, speed_rounds=args.speed_rounds,
                  prune_margin=args.prune_margin, scheduler=args.scheduler, storage=args.storage,
                  max_predicted_ppl=args.max_predicted_ppl, enqueue=args.enqueue, winner=args.winner,
                  winner_ppl_cap=args.winner_ppl_cap, max_ppl_delta=args.max_ppl_delta,
                  eval_settings={"windows": args.windows, "window": args.window, "prefix": args.prefix, "niah_cases": args.niah_cases,
                                 "niah_length": args.niah_length})
    states = {}
    for t in result["trials"]:
        states[t["state"]] = states.get(t["state"], 0) + 1
    console.print(f"{len(result['trials'])} trials ({', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))}); "
                  f"Pareto front: {len(result['pareto'])} points")
    pruned = (result.get("counts") or {}).get("pruned_by")
    if pruned:
        console.print("pruned by a proxy: " + ", ".join(f"{n} by {rule}" for rule, n in sorted(pruned.items())))
    console.print((Path(result["out"]) / "pareto.md").read_text())
    w = result["winner"]
    if w is None:
        console.print(f"no completed trial met the KV budget {args.kv_budget}: raise --kv-budget or --trials")
    else:
        h = w["heldout"]
        console.print(f"winner (trial {w['trial']}): {w['recipe']}\n  held-out: KV fraction {h['kv_fraction']:.3f}, "
                      f"perplexity ratio {h['ppl_ratio']:.4f} (dense {w['heldout_dense_ppl']:.3f})\n  recipe file: {w['toml']}")
    console.print(f"[dim]wrote {result['out']}[/]")
    return 0
