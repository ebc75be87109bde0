"""``graphwright eval``: quality of a recipe against the base model, side by side.

Perplexity (``--task ppl``) over the shipped novel or ``--text FILE``, a seeded
needle-in-a-haystack grid (``--task niah``) and greedy agreement with the base model on 20
passages (``--task agree``). ``--sweep`` evaluates a recipe template at several values
(``--sweep "lowrank_kv(keep={})" --values 0.8 0.6 0.5``) and writes a plot; give ``--sweep``
several times to compare templates (one line each in the plot).
"""

from __future__ import annotations

from rich.table import Table

from .common import add_model_args, add_recipe_arg, compile_model, console, load, write_json


def add_parser(sub):
    p = sub.add_parser("eval", help="measure perplexity / needle accuracy of a recipe vs the base model",
                       description="Evaluate MODEL compiled with RECIPE (or a sweep) against the base model.")
    add_model_args(p)
    add_recipe_arg(p, default="noop")
    p.add_argument("--task", choices=("ppl", "niah", "agree"), default="ppl")
    p.add_argument("--text", default=None, help="text file for perplexity (default: the shipped novel)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of text to score (ppl)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--mode", choices=("window", "stream"), default="window",
                   help="stream = score through decode steps (exercises KV eviction)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="needle prompt lengths (niah)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="needle depths (niah)")
    p.add_argument("--prompts", type=int, default=20, help="prompts for --task agree")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt for --task agree")
    p.add_argument("--sweep", action="append", default=None,
                   help='recipe template with {} for the swept value, e.g. "lowrank_kv(keep={})"; repeatable')
    p.add_argument("--values", nargs="+", default=None, help="values substituted into --sweep")
    p.add_argument("--out", default="results/eval", help="folder for eval.json (and eval.png when sweeping)")


def _one(args, base, tok, recipe, memo):
    """One recipe against the base; ``memo`` keeps the base side's results across a sweep."""
    from ..eval.agreement import compare_greedy
    from ..eval.niah import compare_niah, needle_grid
    from ..eval.perplexity import compare_perplexity

    cm = compile_model(base, tok, recipe, args.backend)
    if args.task == "ppl":
        r = compare_perplexity(base, cm, tokenizer=tok, base_result=memo.get("ppl"), path=args.text,
                               max_tokens=args.tokens, window=args.window, stride=args.stride, mode=args.mode)
        memo["ppl"] = r["base"]
        row = {"recipe": str(cm.recipe or "identity"), "ppl_base": r["base"]["ppl"], "ppl": r["compiled"]["ppl"],
               "delta": r["delta"], "kv_fraction": cm.report().summary["kv_ratio"]}
    elif args.task == "agree":
        r = compare_greedy(base, cm, tok, n_prompts=args.prompts, max_new_tokens=args.new_tokens,
                           base_cache=memo.setdefault("agree", {}))
        row = {"recipe": str(cm.recipe or "identity"), "prefix": r["prefix"], "match": r["match"], "exact": r["exact"],
               "kv_fraction": cm.report().summary["kv_ratio"]}
    else:
        cases = needle_grid(tok, lengths=args.lengths, depths=args.depths, seed=0)
        r = compare_niah(base, cm, tok, cases, base_result=memo.get("niah"))
        memo["niah"] = r["base"]
        row = {"recipe": str(cm.recipe or "identity"), "acc_base": r["base"]["accuracy"], "acc": r["compiled"]["accuracy"],
               "kv_fraction": cm.report().summary["kv_ratio"]}
    return row, r


def run(args):
    model, tok = load(args)
    if args.sweep:
        if not args.values or any("{}" not in t for t in args.sweep):
            raise ValueError('--sweep needs a template containing {} and --values, e.g. --sweep "lowrank_kv(keep={})" --values 0.8 0.5')
        recipes = [(t, v, t.replace("{}", v)) for t in args.sweep for v in args.values]
    else:
        recipes = [(None, None, args.recipe)]
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
