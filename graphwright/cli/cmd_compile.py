"""``graphwright compile``: compile a model with a recipe and print the report."""

from __future__ import annotations

from .common import add_model_args, add_recipe_arg, compile_model, console, load, write_json


def add_parser(sub):
    p = sub.add_parser("compile", help="compile a model with a recipe and show what changed",
                       description="Capture MODEL, apply RECIPE, verify, and print the per-layer report.")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--diff", action="store_true", help="also print the node diff against the identity graph")


def run(args):
    import graphwright as gw

    model, tok = load(args)
    cm = compile_model(model, tok, args.recipe, args.backend)
    report = cm.report()
    console.print(report)
    if args.diff:
        base = gw.compile(model, tokenizer=tok)
        console.print(gw.inspect.diff(base, cm))
    if args.json:
        write_json(report.to_dict(), args.json)
        console.print(f"[dim]report written to {args.json}[/]")
