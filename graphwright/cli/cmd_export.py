"""``graphwright export``: compile a model with a recipe and write it as an ONNX artifact."""

from __future__ import annotations

from pathlib import Path

from .common import add_model_args, add_recipe_arg, compile_model, console, int_arg, load, out_dir


def add_parser(sub):
    p = sub.add_parser("export", help="export a compiled model to ONNX (model.onnx + graphwright.json)",
                       description="Compile MODEL with RECIPE, export it as ONNX to OUT and verify the artifact "
                                   "in ONNX Runtime against the torch module.")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("--out", type=out_dir, default="out/onnx", help="output directory (default: %(default)s)")
    p.add_argument("--opset", type=int_arg(23, 10_000), default=23,
                   help="ONNX opset, >= 23 and at most what the installed onnx knows (default: %(default)s)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip running the artifact against the torch module")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not a previous graphwright export "
                        "(a file graphwright did not write is never replaced)")
    p.add_argument("--timings", action="store_true",
                   help="print where the export's time went: seconds per phase (also in graphwright.json under \"export\")")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args):
    import json
    import shutil

    import onnx

    import graphwright as gw

    if args.opset > onnx.defs.onnx_opset_version():
        raise ValueError(f"--opset {args.opset}: the installed onnx {onnx.__version__} knows opsets up to "
                         f"{onnx.defs.onnx_opset_version()}; give 23..{onnx.defs.onnx_opset_version()}")
    model, tok = load(args)
    cm = compile_model(model, tok, args.recipe, args.backend)
    target = Path(args.out)
    fresh = not target.exists() or (target.is_dir() and not any(target.iterdir()))
    try:
        with console.status(f"exporting to {args.out} ..."):
            out = gw.export_onnx(cm, args.out, opset=args.opset, verify=args.verify, overwrite=args.overwrite)
    except BaseException:
        # A folder this export created (or found empty) and left without graphwright.json is half-written: remove it.
        # An artifact whose metadata was written (e.g. one that then failed verification) is kept; its metadata says so.
        if fresh and target.is_dir() and not (target / "graphwright.json").exists():
            shutil.rmtree(target, ignore_errors=True)
        raise
    meta = json.loads((out / "graphwright.json").read_text())
    model_bytes = sum((out / f).stat().st_size for f in ("model.onnx", "model.onnx.data", "decode.onnx", "decode.onnx.data")
                      if (out / f).exists())
    console.print(f"wrote [bold]{out}[/]: model {model_bytes / 2**20:.1f} MiB, {_size(out) / 2**20:.1f} MiB in all "
                  f"(opset {meta['opset']}, recipe {meta['recipe']})")
    v = meta.get("verification")
    if v:
        steps = ", ".join(f"{s['step']} {s['max_abs_logit_diff']:.2g}" for s in v["steps"])
        console.print(f"verified in ONNX Runtime: max |dlogit| {v['max_abs_logit_diff']:.3g} <= {v['tolerance']:g} ({steps})")
    else:
        console.print("not verified (--no-verify)")
    if args.timings:
        from ..codegen.onnx.phases import timings_table

        console.print(timings_table(meta["export"]), markup=False, highlight=False)
