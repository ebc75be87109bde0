"""``graphwright inspect``: graph picture, networkx summary and node diff of a recipe."""

from __future__ import annotations

from .common import add_model_args, add_recipe_arg, compile_model, console, load, out_dir, write_json


def add_parser(sub):
    p = sub.add_parser("inspect", help="render the step graph and diff it against the identity graph",
                       description="Compile MODEL with RECIPE; write an HTML picture of the graph, the report and the diff.")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("--out", type=out_dir, default="out/inspect", help="folder for graph.html, report.json, diff.json")


def run(args):
    from pathlib import Path

    import graphwright as gw

    model, tok = load(args)
    cm = compile_model(model, tok, args.recipe, args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gw.inspect.render(cm, out / "graph.html")
    g = gw.inspect.to_networkx(cm)
    base = gw.compile(model, tokenizer=tok)
    d = gw.inspect.diff(base, cm)
    console.print(cm.report())
    console.print(d)
    write_json(cm.report().to_dict(), out / "report.json")
    write_json(d.to_dict(), out / "diff.json")
    console.print(f"graph: {g.number_of_nodes()} nodes, {g.number_of_edges()} edges -> {out / 'graph.html'}")
