"""``graphwright steer``: PASTA head profiling and held-out steering accuracy.

``graphwright steer profile --task json --out heads.json`` ranks heads coarse-to-fine on the
task's training split and writes a head-set JSON (also cached for ``steer(heads='auto')``).
``graphwright steer eval --task json --heads heads.json`` measures the held-out split unsteered,
with that head set, and with a random head set of the same size (and ``--all``: every head).

``--task`` is a built-in task (json, pronoun) or ``module:function`` returning
``(train_task, test_task)`` for ``(n_train, n_test, seed)``: tasks are plain objects
(``graphwright.steer.tasks.Task``: examples + scorer), so users plug their own in.
"""

from __future__ import annotations

import importlib

from rich.table import Table

from .common import add_model_args, console, float_arg, int_arg, load, out_dir, out_file, write_json


def add_parser(sub):
    p = sub.add_parser("steer", help="profile steering heads for a task / measure steered accuracy (PASTA)",
                       description="PASTA attention steering: head profiling and held-out accuracy.")
    ss = p.add_subparsers(dest="steer_command", metavar="ACTION")
    ss.required = True
    for name, doc in (("profile", "rank heads coarse-to-fine on the training split; write a head-set JSON"),
                      ("eval", "held-out accuracy: unsteered vs a head set vs a random head set of the same size")):
        q = ss.add_parser(name, help=doc, description=doc)
        add_model_args(q)
        q.add_argument("--task", default="json", help="json, pronoun, or module:function returning (train, test) tasks")
        q.add_argument("--seed", type=int_arg(0, 2**63 - 1), default=0, help="task seed (and random head-set seed)")
        q.add_argument("--alpha", type=float_arg(0, 1e6, lo_open=True), default=0.01)
        q.add_argument("--max-new-tokens", type=int_arg(1, 1_000_000), default=48)
        q.add_argument("--batch-size", type=int_arg(1, 4096), default=8)
        q.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
        q.add_argument("--examples", type=int_arg(1, 1_000_000), default=16 if name == "profile" else 40,
                       help="examples of the training (profile) or held-out (eval) split")
        if name == "profile":
            q.add_argument("--mode", choices=("coarse_to_fine", "layers", "heads"), default="coarse_to_fine")
            q.add_argument("--top-layers", type=int_arg(1, 100_000), default=2)
            q.add_argument("--top-heads", type=int_arg(1, 100_000), default=4)
            q.add_argument("--out", type=out_file, default="results/steer/heads.json", help="head-set JSON to write")
        else:
            q.add_argument("--heads", default="auto", help="head-set JSON, 'auto' (last profile of this model) or 'all'")
            q.add_argument("--all", action="store_true", help="also steer every head (the paper's 'all heads' ablation)")
            q.add_argument("--out", type=out_dir, default="results/steer", help="folder for steer_eval.json")


def load_tasks(spec: str, n_train: int, n_test: int, seed: int) -> tuple:
    """(train, test) tasks from a built-in name or ``module:function``."""
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--task {spec!r}: cannot import {fn} from {mod} ({exc})") from exc
        return factory(n_train, n_test, seed)
    from ..steer.tasks import make_splits

    return make_splits(spec, n_train, n_test, seed)


def _steerable(args):
    import graphwright as gw

    from ..steer.profile import steerable

    model, tok = load(args)
    if tok is None:
        raise ValueError(f"steering tasks need a tokenizer and {args.model} has none; use e.g. --model smollm2-135m")
    with console.status("capturing and steering every head ..."):
        return steerable(gw.compile(model, tokenizer=tok), tok)


def run(args):
    return _profile(args) if args.steer_command == "profile" else _eval(args)


def _profile(args):
    from ..steer.profile import profile_heads

    train, _ = load_tasks(args.task, args.examples, 0, args.seed)
    cm = _steerable(args)
    res = profile_heads(cm, train, mode=args.mode, top_layers=args.top_layers, top_heads=args.top_heads, alpha=args.alpha,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out=args.out, chat=not args.no_chat)
    sc = res["scores"]
    metric = res["settings"]["metric"]
    console.print(f"head set for {res['settings']['task']}: {res['heads']}")
    console.print(f"training split ({len(train.examples)} examples) {metric}: unsteered {sc['baseline'][metric]:.3f}, "
                  f"steered {sc['final'][metric]:.3f}")
    console.print(f"[dim]written {args.out}[/]")


def _eval(args):
    from ..passes.steer import parse_heads
    from ..steer.evaluate import compare_head_sets, head_count, random_heads
    from ..steer.heads import model_key

    _, test = load_tasks(args.task, 0, args.examples, args.seed)
    cm = _steerable(args)
    L, H = cm.info.num_layers, cm.info.num_heads
    heads = parse_heads(args.heads, L, H, model_key(cm.step_graph))
    sets = {f"heads={args.heads}": heads, "random (same size)": random_heads(L, H, head_count(heads), args.seed)}
    if args.all:
        sets["all heads"] = parse_heads("all", L, H)
    rows = compare_head_sets(cm, test, sets, alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, chat=not args.no_chat)
    metrics = [k for k in rows[0] if k not in ("config", "heads", "examples", "samples")]
    name = getattr(test, "name", "task")
    table = Table(title=f"steer eval: {name} held-out ({len(test.examples)} examples) on {args.model}, alpha={args.alpha}")
    for col in ("config", "heads", *metrics):
        table.add_column(col)
    for r in rows:
        table.add_row(r["config"], str(r["heads"]), *(f"{r[m]:.3f}" for m in metrics))
    console.print(table)
    path = write_json({"task": name, "model": args.model, "alpha": args.alpha, "head_set": heads, "rows": rows},
                      f"{args.out}/steer_eval_{name}.json")
    console.print(f"[dim]written {path}[/]")
