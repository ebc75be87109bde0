"""KeyDiff block-wise prefill (ALGORITHMS-2 §6d, arXiv 2504.15364): schedule ``block`` against a block-loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

from graphwright.runtime.generate import prompt_blocks
from tests.ops.scorer_oracles import call_op, kept


def keydiff_block_oracle(k, n_block, budget, sinks, window):
    """One row, one KV head (k [T, D]): add each block, then keep sinks + window + the top by -cos(k, mean k/|k|)."""
    cache = []  # positions in order
    for a, b in prompt_blocks(k.shape[0], n_block):
        cache += list(range(a, b))
        if len(cache) <= budget:
            continue
        L = b
        prot = [p for p in cache if p < sinks or p >= L - window]
        cand = [p for p in cache if p not in prot]
        unit = [[float(x) / math.sqrt(sum(float(y) ** 2 for y in k[p])) for x in k[p]] for p in cache]
        anchor = [sum(u[d] for u in unit) / len(unit) for d in range(k.shape[1])]
        na = math.sqrt(sum(x * x for x in anchor))
        score = {p: -sum(float(x) * y for x, y in zip(k[p], anchor)) / (na * float(k[p].norm())) for p in cache}
        best = sorted(cand, key=lambda p: (-score[p], p))[:budget - len(prot)]
        cache = sorted(prot + best)
    return cache


def test_prompt_blocks_are_cut_from_the_end():
    assert prompt_blocks(14, 4) == [(0, 2), (2, 6), (6, 10), (10, 14)]
    assert prompt_blocks(8, 4) == [(0, 4), (4, 8)]
    assert prompt_blocks(3, 4) == [(0, 3)]


@pytest.mark.parametrize("n_block,budget,sinks,window", [(4, 6, 0, 0), (3, 5, 1, 1), (5, 4, 0, 2)])
def test_block_schedule_matches_the_block_loop_oracle(n_block, budget, sinks, window):
    g = torch.Generator().manual_seed(n_block + budget)
    B, H, Hk, T, D = 2, 4, 2, 17, 8
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hk, T, D, generator=g) + 0.7 * torch.randn(B, Hk, 1, D, generator=g)
    v = torch.randn(B, Hk, T, D, generator=g)
    pos = torch.arange(T)[None].expand(B, T)
    ck = cv = ckp = None
    peak = 0
    for a, b in prompt_blocks(T, n_block):
        kp_new = pos[:, None, a:b].expand(B, Hk, b - a)
        ck = k[:, :, a:b] if ck is None else torch.cat([ck, k[:, :, a:b]], 2)
        cv = v[:, :, a:b] if cv is None else torch.cat([cv, v[:, :, a:b]], 2)
        ckp = kp_new if ckp is None else torch.cat([ckp, kp_new], 2)
        peak = max(peak, int((ckp >= 0).sum(-1).max()))
        ck, cv, ckp = call_op(q[:, :, a:b], ck, cv, pos[:, a:b], ckp, scorer="keydiff", when="block", budget_n=budget,
                              sinks=sinks, window=window)
    want = [[keydiff_block_oracle(k[bb, h], n_block, budget, sinks, window) for h in range(Hk)] for bb in range(B)]
    assert kept(ckp) == want
    assert peak <= budget + n_block
    one_shot = call_op(q, k, v, pos, pos[:, None].expand(B, Hk, T), scorer="keydiff", when="prefill", budget_n=budget,
                       sinks=sinks, window=window)
    assert kept(one_shot[2]) != want  # block-wise is not one-shot scoring (the spec's pitfall)
    dec = call_op(q[:, :, -1:], torch.cat([ck, k[:, :, -1:]], 2), torch.cat([cv, v[:, :, -1:]], 2), pos[:, -1:] + 1,
                  torch.cat([ckp, (pos[:, None, -1:] + 1).expand(B, Hk, 1)], 2), scorer="keydiff", when="block",
                  budget_n=budget, sinks=sinks, window=window)
    assert all(len(h) == budget + 1 for row in kept(dec[2]) for h in row)  # a one-token decode step appends
