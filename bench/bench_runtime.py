"""Benchmark graphwright's runtime (identity recipe) against Hugging Face generate().

Usage: python bench/bench_runtime.py --model smollm2-135m --prompt 256 --new 128 --repeats 3

Prints the table of medians and the headline ratio line, and writes the raw result as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import graphwright as gw
from graphwright.bench import bench_generate, format_bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in name, HF folder or .gguf file")
    p.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="results/bench_runtime.json")
    args = p.parse_args(argv)

    model, tok = gw.load_model(args.model)
    cm = gw.compile(model, tokenizer=tok)
    vocab = cm.info.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    result = bench_generate(model, cm, ids, max_new_tokens=args.new, repeats=args.repeats, warmup=args.warmup)
    print(format_bench(result))
    print(f"graphwright/HF decode tokens/s = {result['ratios']['decode_tokens_per_s']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "recipe": "identity", "torch_threads": torch.get_num_threads(),
                               **result}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
