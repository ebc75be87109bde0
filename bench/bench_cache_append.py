"""The torch backend's in-place cache append vs the graph's literal ``cat([cache, new])``, A/B.

Usage: python bench/bench_cache_append.py [--prompt 4000] [--new 32] [--repeats 2] [--threads 2]

One capture of the identity graph, lowered twice: as ``lower`` does it (state appends become
``codegen/torch/cache_append.py``) and with that rewrite turned off (every decode step copies the
whole cache). Greedy decode after a ``--prompt``-token random prompt, alternating the two in one
process; reports decode ms per token and the ratio, and checks both produce the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

import graphwright as gw
from graphwright.codegen.backends import get_backend
from graphwright.compiled import CompiledModel


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", type=int, default=4000)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = gw.load_model(args.model)
    base = gw.compile(model, tokenizer=tok)
    # the torch backend without its cache_append transform: the graph's plain cat
    plain_cat = dataclasses.replace(get_backend("torch"), name="torch_cat", transforms=())
    variants = {"cache_append": CompiledModel(base.step_graph, tokenizer=tok),
                "cat": CompiledModel(base.step_graph, tokenizer=tok, backend=plain_cat)}
    ids = torch.randint(100, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    ms, outs = {k: [] for k in variants}, {}
    for _ in range(args.repeats):
        for name, cm in variants.items():
            outs[name] = cm.generate(ids, max_new_tokens=args.new + 1, eos_token_id=[])
            ms[name].append(cm.last_stats["decode_s"] / args.new * 1e3)
            print(f"{name:13} decode {ms[name][-1]:7.1f} ms/token", flush=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    same = torch.equal(outs["cache_append"], outs["cat"])
    print(f"median: cache_append {med['cache_append']:.1f} ms, cat {med['cat']:.1f} ms -> "
          f"{med['cat'] / med['cache_append']:.2f}x faster decode; same tokens: {same}")


if __name__ == "__main__":
    main()
