"""The fused-MoE torch backend's kernel regimes, forced one at a time, on DRAM-resident weights.

Usage: python bench/bench_moe_regimes.py [--threads 2] [--layers 30]

``--layers`` copies of SmolLM2-MoE-sized expert weights (d=576, I=1536, E=4, top-2, random) so
the weights stream from memory as in a real forward. For each token count, ``moe_experts_sorted``
runs with ``ROW_MAJOR_MIN_PAIRS`` forced to 0 (row-major X @ W^T grouped GEMM: the orientation
transformers computes in), forced very high (weight-stationary W @ X^T), and at its default (the
regime the file picks; one token per hit expert uses the split matvecs). ms per layer, best of 5.
"""

from __future__ import annotations

import argparse
import time

import torch

import graphwright.codegen.torch.moe as moe


def best_ms(fn, layers: int, repeats: int = 5) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3 / layers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, inter, E = 576, 1536, 4
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(E, 2 * inter, d, generator=g) * 0.05, torch.randn(E, d, inter, generator=g) * 0.05)
               for _ in range(args.layers)]
    default = moe.ROW_MAJOR_MIN_PAIRS
    print(f"{'tokens':>6} {'row-major':>10} {'weight-stat.':>12} {'default':>8}  (ms / layer)")
    for n in args.tokens:
        x = torch.randn(n, d, generator=g)
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(n)])
        w = torch.softmax(torch.randn(n, 2, generator=g), -1)
        run = lambda x=x, idx=idx, w=w: [moe.moe_experts_sorted(x, idx, w, gu, dn, "silu") for gu, dn in weights]  # noqa: E731
        row = {}
        for name, threshold in (("row", 0), ("ws", 10 ** 9), ("default", default)):
            moe.ROW_MAJOR_MIN_PAIRS = threshold
            row[name] = best_ms(run, args.layers)
        moe.ROW_MAJOR_MIN_PAIRS = default
        print(f"{n:>6} {row['row']:>10.2f} {row['ws']:>12.2f} {row['default']:>8.2f}")


if __name__ == "__main__":
    main()
