"""ONNX Runtime decode: the numpy/session.run path with eviction split out vs I/O binding with in-graph eviction.

Usage: python bench/bench_onnx_decode.py --model smollm2-135m --prompt 256 --new 32 --repeats 3
       [--recipe identity --recipe "h2o(heavy=64, recent=64)"]

Each recipe is exported once; the same artifact is run two ways, alternating: "before" (numpy
feeds and ``session.run``, every step on ``model.onnx``, eviction by the torch reference between
runs: the path before ``decode.onnx`` and I/O binding) and "after" (``graphwright.load`` defaults:
I/O binding, single-token steps on ``decode.onnx`` when the export has one). Batch 1, greedy,
exactly ``--new`` tokens; prints decode ms/token (median) and whether both sides gave the same tokens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from statistics import median

import torch

import graphwright as gw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", action="append", default=None, help="repeatable; default: identity and h2o(heavy=64, recent=64)")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/bench_onnx_decode.json")
    args = p.parse_args(argv)
    recipes = args.recipe or ["identity", "h2o(heavy=64, recent=64)"]
    model, tok = gw.load_model(args.model)
    model.eval()
    tmp = tempfile.TemporaryDirectory(prefix="gw-onnx-decode-")
    result = {"model": args.model, "prompt": args.prompt, "new": args.new, "recipes": {}}
    for i, recipe in enumerate(recipes):
        cm = gw.compile(model, recipe=None if recipe == "identity" else recipe, tokenizer=tok, verify=False)
        folder = gw.export_onnx(cm, Path(tmp.name) / f"r{i}")
        before = gw.load(folder, io_binding=False)
        before.step.decode = None  # every step on model.onnx, eviction split out
        after = gw.load(folder)
        vocab = cm.info.vocab_size
        ids = torch.randint(min(100, vocab - 1), vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        ms = {"before": [], "after": []}
        toks = {}
        for _ in range(1 + args.repeats):  # the first round warms up
            for side, runner in (("before", before), ("after", after)):
                toks[side] = runner.generate(ids, attention_mask=mask, max_new_tokens=args.new, eos_token_id=[])
                ms[side].append(1000 / runner.last_stats["decode_tokens_per_s"])  # batch 1
        row = {side: median(v[1:]) for side, v in ms.items()}
        row["same_tokens"] = bool(torch.equal(toks["before"], toks["after"]))
        row["decode_graph"] = after.metadata.get("decode") is not None
        result["recipes"][recipe] = row
        print(f"{recipe}: decode ms/token before {row['before']:.2f}, after {row['after']:.2f} "
              f"(decode graph: {row['decode_graph']}, same tokens: {row['same_tokens']})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
