"""``graphwright bench``: speed and KV memory of a recipe vs the base model, measured alternately."""

from __future__ import annotations

import torch

from .common import add_model_args, add_recipe_arg, compile_model, console, int_arg, load, out_dir, write_json


def add_parser(sub):
    p = sub.add_parser("bench", help="prefill/decode tokens/s and KV bytes vs the base model, as ratios",
                       description="Measure MODEL vs MODEL compiled with RECIPE, alternating runs, medians and ratios.")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("--prompt", type=int_arg(1, 1_000_000), default=256, help="prompt length in tokens")
    p.add_argument("--new", type=int_arg(1, 1_000_000), default=64, help="new tokens per generation")
    p.add_argument("--batch", type=int_arg(1, 4096), default=1)
    p.add_argument("--repeats", type=int_arg(1, 1000), default=3)
    p.add_argument("--out", type=out_dir, default="results/bench", help="folder for bench.json")


def run(args):
    from ..bench import bench_generate, format_bench

    model, tok = load(args)
    cm = compile_model(model, tok, args.recipe, args.backend)
    g = torch.Generator().manual_seed(0)
    vocab = cm.info.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (args.batch, args.prompt), generator=g)
    result = bench_generate(model, cm, ids, max_new_tokens=args.new, repeats=args.repeats)
    console.print(format_bench(result))
    path = write_json({"model": args.model, "recipe": str(cm.recipe or "identity"), **result}, f"{args.out}/bench.json")
    console.print(f"[dim]written {path}[/]")
