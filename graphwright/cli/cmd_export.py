"""``graphwright export``: write the compiled step graph as an ONNX artifact."""

from __future__ import annotations

from .common import add_model_args, add_recipe_arg


def add_parser(sub):
    p = sub.add_parser("export", help="export a compiled model to ONNX (lands with the ONNX issue)",
                       description="Compile MODEL with RECIPE and export it as ONNX to OUT.")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("--out", default="out/onnx")


def run(args):
    import graphwright as gw

    if not hasattr(gw, "export_onnx"):
        raise NotImplementedError("ONNX export is not implemented yet (tracked by the ONNX export issue)")
    from .common import compile_model, load

    model, tok = load(args)
    gw.export_onnx(compile_model(model, tok, args.recipe), args.out)
