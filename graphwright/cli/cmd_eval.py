"""``graphwright eval``: quality of a recipe against the base model, side by side.

Perplexity (``--task ppl``) over the shipped novel or ``--text FILE``, a seeded
needle-in-a-haystack grid (``--task niah``) and greedy agreement with the base model on 20
passages (``--task agree``). Perplexity's default mode is the one in which the recipe's rewrites
act: ``stream`` (decode steps) when a pass changes what the KV cache holds (read from the passes'
declared facts, ``eval.modes``), ``window`` otherwise; the output says which and why, and
``kv_fraction`` is what the run really held (``cm.last_stats`` after the last window).
``--suite long`` runs the long-context suite (``graphwright.eval.suite``: needles, RULER-style
tasks, streamed held-out perplexity) for every ``--recipe`` and writes suite.json, suite.md and
suite.png. ``--recipe`` may be given several times. ``--sweep`` evaluates a recipe template at several values
(``--sweep "lowrank_kv(keep={})" --values 0.8 0.6 0.5``) and writes a plot; give ``--sweep``
several times to compare templates (one line each in the plot).
"""

from __future__ import annotations

from rich.table import Table

from .common import add_model_args, compile_model, console, float_arg, in_file, int_arg, load, out_dir, write_json

SUITE_DEFAULTS = {"lengths": [1024, 2048, 4096, 8192], "cases": 50}


def add_parser(sub):
    from ..codegen.backends import BACKENDS
    from ..eval.ruler import TASKS as RULER_TASKS

    p = sub.add_parser("eval", help="measure perplexity / needle accuracy of a recipe vs the base model",
                       description="Evaluate MODEL compiled with RECIPE (or a sweep) against the base model.")
    add_model_args(p)
    p.add_argument("--recipe", action="append", default=None,
                   help='recipe string like "h2o(heavy=0.25, recent=0.25)" or a .toml file; repeatable (default: noop)')
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="kernels for the graph's ops: " + "; ".join(f"{b.name}: {b.doc}" for b in BACKENDS.values()))
    p.add_argument("--task", choices=("ppl", "niah", "agree"), default="ppl")
    p.add_argument("--suite", choices=("long",), default=None,
                   help="long = the long-context suite (needles, RULER-style tasks, streamed held-out perplexity) for every --recipe")
    p.add_argument("--tasks", nargs="+", choices=("niah", "ruler", "ppl"), default=["niah", "ruler", "ppl"], help="suite parts (--suite)")
    p.add_argument("--cases", type=int_arg(1, 1_000_000), default=None,
                   help="suite cases per length (niah) and per task and length (ruler); default 50")
    p.add_argument("--ruler-tasks", nargs="+", choices=RULER_TASKS, default=list(RULER_TASKS), help="RULER-style tasks (--suite)")
    p.add_argument("--ruler-lengths", type=int_arg(16, 10_000_000), nargs="+", default=[1024, 2048, 4096], help="RULER lengths in tokens (--suite)")
    p.add_argument("--ppl-windows", type=int_arg(1, 1_000_000), default=8,
                   help="held-out perplexity windows (--suite); each scores window - prefix - 1 tokens "
                        "as decode steps would (default 8 x 2,047 tokens)")
    p.add_argument("--ppl-block", type=int_arg(0, 10_000_000), default=512,
                   help="score the continuation in teacher-forced steps of N tokens where that equals decode steps "
                        "(dense, snapkv and its head budgets, duo: minutes instead of ~20 min per recipe); 0: one decode "
                        "step per token for every recipe (--suite)")
    p.add_argument("--ppl-window", type=int_arg(2, 10_000_000), default=4096, help="tokens per held-out window (--suite)")
    p.add_argument("--ppl-prefix", type=int_arg(1, 10_000_000), default=2048,
                   help="tokens prefilled per window; the rest is scored by decode steps (--suite)")
    p.add_argument("--seed", type=int_arg(0, 2**63 - 1), default=0, help="case seed (--suite)")
    p.add_argument("--text", type=in_file, default=None, help="text file for perplexity (default: the shipped novel)")
    p.add_argument("--tokens", type=int_arg(2, 1_000_000_000), default=2048, help="tokens of text to score (ppl)")
    p.add_argument("--window", type=int_arg(2, 10_000_000), default=512)
    p.add_argument("--stride", type=int_arg(1, 10_000_000), default=256)
    p.add_argument("--mode", choices=("window", "stream"), default=None,
                   help="stream = score through decode steps (exercises KV eviction); default: stream when a pass changes "
                        "what the KV cache holds, else window")
    p.add_argument("--lengths", type=int_arg(16, 10_000_000), nargs="+", default=None,
                   help="needle prompt lengths (niah: default 256 512; --suite: default 1024 2048 4096 8192)")
    p.add_argument("--depths", type=float_arg(0, 1), nargs="+", default=[0.0, 0.5, 1.0], help="needle depths (niah)")
    p.add_argument("--prompts", type=int_arg(1, 1_000_000), default=20, help="prompts for --task agree")
    p.add_argument("--new-tokens", type=int_arg(1, 1_000_000), default=32, help="greedy tokens per prompt for --task agree")
    p.add_argument("--sweep", action="append", default=None,
                   help='recipe template with {} for the swept value, e.g. "lowrank_kv(keep={})"; repeatable')
    p.add_argument("--values", nargs="+", default=None, help="values substituted into --sweep")
    p.add_argument("--out", type=out_dir, default="results/eval", help="folder for eval.json (and eval.png when sweeping; suite.* with --suite)")


def _one(args, base, tok, recipe, memo):
    """One recipe against the base; ``memo`` keeps the base side's results across a sweep."""
    from ..eval.agreement import compare_greedy
    from ..eval.modes import default_ppl_mode
    from ..eval.niah import compare_niah, needle_grid
    from ..eval.perplexity import compare_perplexity

    cm = compile_model(base, tok, recipe, args.backend)
    if args.task == "ppl":
        mode, why = (args.mode, "given with --mode") if args.mode else default_ppl_mode(cm)
        console.print(f"[dim]{cm.recipe or 'identity'}: perplexity mode {mode} ({why})[/]")
        r = compare_perplexity(base, cm, tokenizer=tok, base_result=memo.get(f"ppl-{mode}"), path=args.text,
                               max_tokens=args.tokens, window=args.window, stride=args.stride, mode=mode)
        memo[f"ppl-{mode}"] = r["base"]
        held = cm.last_stats  # the cache the last window really held (window: its prefill; stream: after its last decode step)
        row = {"recipe": str(cm.recipe or "identity"), "mode": mode, "ppl_base": r["base"]["ppl"], "ppl": r["compiled"]["ppl"],
               "delta": r["delta"], "kv_fraction": held.get("kv_fraction")}
        r["mode_reason"] = why
    elif args.task == "agree":
        r = compare_greedy(base, cm, tok, n_prompts=args.prompts, max_new_tokens=args.new_tokens,
                           base_cache=memo.setdefault("agree", {}))
        row = {"recipe": str(cm.recipe or "identity"), "prefix": r["prefix"], "match": r["match"], "exact": r["exact"],
               "kv_fraction": cm.report().summary["kv_ratio"]}
    else:
        cases = needle_grid(tok, lengths=args.lengths or [256, 512], depths=args.depths, seed=0)
        r = compare_niah(base, cm, tok, cases, base_result=memo.get("niah"))
        memo["niah"] = r["base"]
        row = {"recipe": str(cm.recipe or "identity"), "acc_base": r["base"]["accuracy"], "acc": r["compiled"]["accuracy"],
               "kv_fraction": cm.report().summary["kv_ratio"]}
    return row, r


def _text_tokenizer(args, model, tok):
    """The model's tokenizer, or the byte-level one for a model that ships none (the tiny built-ins)."""
    from ..eval.bytetok import ByteTokenizer

    if tok is not None:
        return tok
    if getattr(model.config, "vocab_size", 0) < 256:
        raise SystemExit(f"{args.model} has no tokenizer and fewer than 256 token ids: evaluation over text needs one")
    console.print(f"[dim]{args.model} ships no tokenizer: using the byte-level tokenizer (one token per UTF-8 byte)[/]")
    return ByteTokenizer()


def run_suite_cli(args, model, tok):
    from ..eval.suite import run_suite

    recipes = [r for r in (args.recipe or []) if r not in ("noop", "identity", "dense")]
    res = run_suite(model, tok, recipes, tasks=args.tasks, lengths=args.lengths or SUITE_DEFAULTS["lengths"],
                    cases=args.cases or SUITE_DEFAULTS["cases"], ruler_tasks=args.ruler_tasks, ruler_lengths=args.ruler_lengths,
                    ppl_windows=args.ppl_windows, ppl_window=args.ppl_window, ppl_prefix=args.ppl_prefix, seed=args.seed,
                    backend=args.backend, out=args.out, ppl_block=args.ppl_block or None)
    table = Table(title=f"graphwright eval --suite long on {args.model}")
    for col in ("task", "metric", "recipe", "value [95% CI]", "vs dense [95% CI]", "KV fraction"):
        table.add_column(col, overflow="fold")
    for r in res["rows"]:
        d = "{:+.1%}" if r["task"] == "ppl" else "{:+.3g}"  # perplexity: relative change vs dense
        table.add_row(r["task"], r["metric"], r["recipe"], f"{r['value']:.3g} [{r['lo']:.3g}, {r['hi']:.3g}]",
                      f"{d.format(r['delta'])} [{d.format(r['delta_lo'])}, {d.format(r['delta_hi'])}]",
                      "-" if r["kv_fraction"] is None else f"{r['kv_fraction']:.3g}")
    console.print(table)
    if res.get("ruler_chance") is not None:
        console.print(f"RULER headline tasks (dense above chance): {', '.join(res['ruler_headline_tasks']) or 'none'}; "
                      f"left out of the headline: {', '.join(res['ruler_excluded_tasks']) or 'none'}")
    for f in res["files"]:
        console.print(f"[dim]written {f}[/]")


def run(args):
    if args.suite and args.ppl_prefix >= args.ppl_window:
        raise ValueError(f"--ppl-prefix {args.ppl_prefix} must be below --ppl-window {args.ppl_window} (the rest of the window is scored)")
    model, tok = load(args)
    tok = _text_tokenizer(args, model, tok)
    if args.suite:
        return run_suite_cli(args, model, tok)
    if args.sweep:
        if not args.values or any("{}" not in t for t in args.sweep):
            raise ValueError('--sweep needs a template containing {} and --values, e.g. --sweep "lowrank_kv(keep={})" --values 0.8 0.5')
        recipes = [(t, v, t.replace("{}", v)) for t in args.sweep for v in args.values]
    else:
        recipes = [(None, None, r) for r in (args.recipe or ["noop"])]
    rows, raw, memo = [], [], {}
    for template, value, recipe in recipes:
        row, r = _one(args, model, tok, recipe, memo)
        if value is not None:
            row["value"] = float(value) if value.replace(".", "", 1).isdigit() else value
        if args.sweep and len(args.sweep) > 1:
            row["template"] = template
        rows.append(row)
        raw.append(r)
    table = Table(title=f"graphwright eval: {args.task} on {args.model}")
    shown = [k for k in rows[0] if k != "template"]  # the recipe column already says it
    for key in shown:
        table.add_column(key, overflow="fold")
    for row in rows:
        table.add_row(*(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in shown))
    console.print(table)
    path = write_json({"task": args.task, "model": args.model, "rows": rows, "details": raw}, f"{args.out}/eval.json")
    console.print(f"[dim]written {path}[/]")
    if args.sweep and len(rows) > 1:
        from ..eval.plot import plot_sweep

        y = {"ppl": "delta", "niah": "acc", "agree": "prefix"}[args.task]
        png = plot_sweep(rows, x="value", y=y, group="template" if len(args.sweep) > 1 else None,
                         path=f"{args.out}/eval.png", title=f"{' vs '.join(args.sweep)} on {args.model}")
        console.print(f"[dim]plot {png}[/]")
