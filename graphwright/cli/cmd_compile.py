"""``graphwright compile``: compile a model with a recipe and print the report."""

from __future__ import annotations

from .common import add_model_args, add_recipe_arg, compile_model, console, load, out_file, write_json


def add_parser(sub):
    p = sub.add_parser("compile", help="compile a model with a recipe and show what changed",
                       description="Capture MODEL, apply RECIPE, verify, and print the per-layer report.")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("--json", type=out_file, default=None, help="write the report as JSON here")
    p.add_argument("--diff", action="store_true", help="also print the node diff against the identity graph")
    p.add_argument("--matrix", nargs="*", default=None, metavar="PASS",
                   help="instead of one recipe: try every ordered pair of these passes (default: the attention "
                        "passes) with small lossy settings and print the composition matrix (use --model tiny-llama)")


def run_matrix(args):
    from ..eval.composition import DEFAULT_PASSES, composition_matrix, registry_settings, render_matrix
    from .common import fail

    passes = tuple(args.matrix) or DEFAULT_PASSES
    known = registry_settings()
    unknown = [p for p in passes if p not in known]
    if unknown:
        fail(f"--matrix: unknown pass(es) {unknown}; choose from {sorted(known)}")
    model, _ = load(args)
    with console.status(f"compiling {len(passes) * (len(passes) - 1)} ordered pairs ..."):
        cells = composition_matrix(model, passes)
    console.print(render_matrix(cells, passes), soft_wrap=True)
    for (a, b), cell in cells.items():
        if cell["status"] != "ok":
            console.print(f"[dim]{a} + {b}: {cell['status']}: {cell['reason']}[/]")
    if args.json:
        write_json({f"{a} + {b}": cell for (a, b), cell in cells.items()}, args.json)
    if any(cell["status"] == "error" for cell in cells.values()):
        raise SystemExit(1)


def run(args):
    import graphwright as gw

    if args.matrix is not None:
        return run_matrix(args)
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
