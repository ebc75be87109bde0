"""Decode speed of lowrank_kv (LoRC) against the dense identity graph, measured alternately.

Usage: python bench/bench_lowrank_kv.py --keep 0.5 --prompt 256 --new 64 --repeats 3

Both graphs come from one capture; runs alternate (dense, lowrank, dense, ...) so machine load
affects both alike; the medians of ``last_stats["decode_tokens_per_s"]`` give the ratio.
LoRC rebuilds every cached key from its latent at each step (RoPE blocks folding B_K into the
queries), so on CPU it trades decode compute for KV memory; the ratio says how much.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import graphwright as gw
from graphwright.compiled import CompiledModel
from graphwright.passes.base import PassContext
from graphwright.passes.lowrank_kv import LowRankKV


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--schedule", default="progressive", choices=["progressive", "uniform"])
    p.add_argument("--value-path", default="absorbed", choices=["absorbed", "reconstruct"])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/bench_lowrank_kv.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared, oversubscribed machine one thread was 3-4x faster)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = gw.load_model(args.model)
    sg = gw.capture(model)
    dense = CompiledModel(sg, tokenizer=tok)
    low = CompiledModel(LowRankKV(keep=args.keep, schedule=args.schedule, value_path=args.value_path)
                        .run(sg.copy(), PassContext(model=model)), tokenizer=tok)
    vocab = sg.info.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    runs = {"dense": [], "lowrank": []}
    stats = {}
    for name, cm in (("dense", dense), ("lowrank", low)):  # warm-up
        cm.generate(ids, 4, eos_token_id=[])
    for _ in range(args.repeats):
        for name, cm in (("dense", dense), ("lowrank", low)):
            cm.generate(ids, args.new, eos_token_id=[])
            runs[name].append(cm.last_stats["decode_tokens_per_s"])
            stats[name] = dict(cm.last_stats)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["lowrank"] / med["dense"]
    print(f"threads={torch.get_num_threads()} prompt={args.prompt} new={args.new} repeats={args.repeats}")
    for k in ("dense", "lowrank"):
        print(f"{k:>8}: decode {med[k]:7.2f} tok/s (runs {', '.join(f'{x:.2f}' for x in runs[k])}), "
              f"kv_bytes {stats[k]['kv_bytes']:,}")
    print(f"lowrank_kv(keep={args.keep})/dense decode tokens/s = {ratio:.3f}; "
          f"KV bytes ratio = {stats['lowrank']['kv_bytes'] / stats['dense']['kv_bytes']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "keep": args.keep, "schedule": args.schedule,
                               "value_path": args.value_path, "prompt": args.prompt, "new": args.new,
                               "torch_threads": torch.get_num_threads(), "decode_tokens_per_s": runs,
                               "median": med, "ratio": ratio,
                               "kv_bytes": {k: stats[k]["kv_bytes"] for k in stats}}, indent=2))


if __name__ == "__main__":
    main()
