"""Decode speed of lowrank_kv (LoRC) against the dense identity graph, measured alternately.

Usage: python bench/bench_lowrank_kv.py --keep 0.5 --prompt 1024 4096 --new 32 --repeats 3

Both graphs come from one capture; for each prompt length the runs alternate (dense, lowrank,
dense, ...) in one process so machine load affects both alike; the medians of
``last_stats["decode_tokens_per_s"]`` give decode ms/token and the lowrank/dense ratios.
LoRC rebuilds every cached key from its latent at each step (RoPE blocks folding B_K into the
queries), so on CPU it trades decode compute for KV memory; the ratio says how much, and how it
moves with the cache length (the arithmetic is in ``graphwright/codegen/torch/latent_attention.py``).
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
    p.add_argument("--prompt", type=int, nargs="+", default=[1024], help="prompt lengths (cache size at decode)")
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
    results = []
    for n_prompt in args.prompt:
        ids = torch.randint(min(100, vocab - 1), vocab, (1, n_prompt), generator=torch.Generator().manual_seed(0))
        results.append(measure(dense, low, ids, args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "keep": args.keep, "schedule": args.schedule,
                               "value_path": args.value_path, "new": args.new, "repeats": args.repeats,
                               "torch_threads": torch.get_num_threads(), "results": results}, indent=2))


def measure(dense, low, ids, args) -> dict:
    """Alternating runs at one prompt length; prints and returns medians and ratios."""
    runs = {"dense": [], "lowrank": []}
    stats = {}
    for cm in (dense, low):  # warm-up
        cm.generate(ids, 4, eos_token_id=[])
    for _ in range(args.repeats):
        for name, cm in (("dense", dense), ("lowrank", low)):
            cm.generate(ids, args.new, eos_token_id=[])
            runs[name].append(cm.last_stats["decode_tokens_per_s"])
            stats[name] = dict(cm.last_stats)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ms = {k: 1e3 / v for k, v in med.items()}
    kv = {k: stats[k]["kv_bytes"] for k in stats}
    print(f"threads={torch.get_num_threads()} prompt={ids.shape[1]} new={args.new} repeats={args.repeats}")
    for k in ("dense", "lowrank"):
        print(f"{k:>8}: decode {ms[k]:7.2f} ms/token, {med[k]:7.2f} tok/s (runs {', '.join(f'{x:.2f}' for x in runs[k])}), "
              f"kv_bytes {kv[k]:,}")
    print(f"lowrank_kv(keep={args.keep})/dense: ms/token {ms['lowrank'] / ms['dense']:.3f}, "
          f"tokens/s {med['lowrank'] / med['dense']:.3f}, KV bytes {kv['lowrank'] / kv['dense']:.3f}")
    return {"prompt": ids.shape[1], "decode_tokens_per_s": runs, "median_tokens_per_s": med, "ms_per_token": ms,
            "ratio_tokens_per_s": med["lowrank"] / med["dense"], "ratio_ms_per_token": ms["lowrank"] / ms["dense"],
            "kv_bytes": kv}

if __name__ == "__main__":
    main()
