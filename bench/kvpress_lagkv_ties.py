"""Which tied LagKV tokens kvpress keeps: ``torch.topk`` on LagKV's score layout at 1,024 tokens, 50% kept.

LagKV ranks tokens within each 128-token partition (rank / 128), so every scored partition holds one token of each
rank and the budget boundary falls among tokens of equal score. kvpress (``ScorerPress.compress``) keeps the top
n_kept with ``torch.topk``, graphwright's op breaks ties by position (earliest kept). This script builds the score
kvpress's ``LagKVPress.score`` gives (sinks and tail 1, ranks of random arrangements elsewhere) and counts, per
scored partition, how many tokens ``topk`` keeps.

Usage (any torch; the kvpress environment's for kvpress's): ``bench/.venv-kvpress/bin/python bench/kvpress_lagkv_ties.py``
"""

from __future__ import annotations

import torch

N, LAG, SINKS, KEPT, TRIALS = 1024, 128, 4, 512, 200


def kept_per_partition(seed: int) -> tuple:
    m = (N - SINKS) // LAG
    end = SINKS + m * LAG
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(LAG, generator=g) for _ in range(m - 1)]).float() / LAG
    score = torch.cat([torch.ones(SINKS), ranks.reshape(-1), torch.ones(LAG + N - end)])[None, None].expand(1, 3, N)
    kept = torch.zeros(N, dtype=torch.bool)
    kept[score.topk(KEPT, dim=-1).indices[0, 0]] = True
    return tuple(kept[SINKS:end - LAG].reshape(m - 1, LAG).sum(1).tolist())


def main() -> int:
    pats: dict = {}
    for seed in range(TRIALS):
        p = kept_per_partition(seed)
        pats[p] = pats.get(p, 0) + 1
    earliest = (43, 43, 43, 43, 42, 42)  # graphwright: ties to the earliest positions
    print(f"torch {torch.__version__}: {len(pats)} patterns over {TRIALS} arrangements; graphwright's {earliest} in "
          f"{pats.get(earliest, 0)}; most common: {sorted(pats.items(), key=lambda t: -t[1])[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
