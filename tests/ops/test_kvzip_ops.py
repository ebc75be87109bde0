"""KVzip's maths (``ops/scorers/kvzip.py``): replay scores against a loop oracle, the allocation against a brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from graphwright.ops.scorers.kvzip import keep_sets, pool_latent, pruned_count, replay_scores


def scores_oracle(q, k, q_pos, k_pos, scale, sink_end, lo, hi):
    """Loop over (row, KV head, query head, query, key): softmax over the allowed keys, max per key."""
    B, H, T, D = q.shape
    hk, S = k.shape[1], k.shape[2]
    g = H // hk
    out = torch.zeros(B, hk, S)
    for b in range(B):
        start = int(q_pos[b].min())
        for h in range(H):
            kv = h // g
            for t in range(T):
                qp = int(q_pos[b, t])
                allowed = [j for j in range(S) if k_pos[b, kv, j] >= 0 and k_pos[b, kv, j] <= qp and (
                    k_pos[b, kv, j] < sink_end or lo <= k_pos[b, kv, j] < hi or k_pos[b, kv, j] >= start)]
                logits = {j: float(q[b, h, t].double() @ k[b, kv, j].double()) * scale for j in allowed}
                m = max(logits.values())
                z = sum(math.exp(v - m) for v in logits.values())
                for j, v in logits.items():
                    out[b, kv, j] = max(float(out[b, kv, j]), math.exp(v - m) / z)
    return out


@pytest.mark.parametrize("sink_end,lo,hi", [(0, 0, 10), (2, 3, 8), (4, 4, 10)])
def test_replay_scores_equal_loop_oracle(sink_end, lo, hi):
    g = torch.Generator().manual_seed(sink_end + lo)
    B, H, hk, D, n, T = 2, 4, 2, 8, 10, 5
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, hk, n + T, D, generator=g)
    ctx_pos = torch.arange(n)[None, None].expand(B, hk, n).clone()
    ctx_pos[1, :, :3] = -1  # row 1: left padding (3 slots hold no key)
    ctx_pos[1, :, 3:] -= 3
    q_pos = torch.stack([torch.arange(n, n + T), torch.arange(n - 3, n - 3 + T)])
    k_pos = torch.cat([ctx_pos, q_pos[:, None].expand(B, hk, T)], 2)
    got = replay_scores(q, k, q_pos, k_pos, 0.4, sink_end, lo, hi)
    want = scores_oracle(q, k, q_pos, k_pos, 0.4, sink_end, lo, hi)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    # a key outside the sinks and the chunk is never attended: score 0
    outside = (ctx_pos >= sink_end) & ((ctx_pos < lo) | (ctx_pos >= hi))
    assert (got[:, :, :n][outside] == 0).all()
    assert (got[:, :, :n][(ctx_pos >= lo) & (ctx_pos < hi)] > 0).all()


def brute_force(scores, sinks, budget_n, budget_f, layerwise):
    """The kept set: of all subsets of the pruned size, the one with the smallest score sum (sinks scored max + 1)."""
    top = max(float(s.max()) for s in scores) + 1.0
    flat = []
    for li, s in enumerate(scores):
        for h in range(s.shape[0]):
            for j in range(s.shape[1]):
                flat.append((li, h, j, top if j < sinks else float(s[h, j])))
    groups = [[x for x in flat if x[0] == li] for li in range(len(scores))] if layerwise else [flat]
    kept = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    n = scores[0].shape[1]
    for grp in groups:
        drop = pruned_count(len(grp), budget_n, budget_f, n)
        best = min(itertools.combinations(grp, drop), key=lambda c: sum(x[3] for x in c))
        for li, h, j, _ in best:
            kept[li][h, j] = False
    return kept


@pytest.mark.parametrize("budget_n,budget_f", [(0, 0.5), (0, 0.25), (0, 0.7), (2, 0.0), (3, 0.0)])
@pytest.mark.parametrize("layerwise", [False, True])
def test_keep_sets_equal_brute_force(budget_n, budget_f, layerwise):
    g = torch.Generator().manual_seed(budget_n + int(budget_f * 100) + layerwise)
    scores = [torch.rand(2, 4, generator=g) * (1 + 3 * layer) for layer in range(2)]  # layer 1 scores higher
    got = keep_sets(scores, 1, budget_n, budget_f, layerwise)
    want = brute_force(scores, 1, budget_n, budget_f, layerwise)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert all(s[:, :1].all() for s in got)  # the sink is kept
    total = sum(int(s.sum()) for s in got)
    want_total = 16 - (2 * pruned_count(8, budget_n, budget_f, 4) if layerwise else pruned_count(16, budget_n, budget_f, 4))
    assert total == want_total
    if not layerwise and budget_f == 0.5:  # one budget over layers: the higher-scoring layer keeps more
        assert int(got[1].sum()) > int(got[0].sum())


@pytest.mark.parametrize("budget_n,budget_f", [(0, 0.5), (0, 0.3), (2, 0.0)])
@pytest.mark.parametrize("layerwise", [False, True])
def test_latent_layer_pools_heads_by_max_then_selects_tokens(budget_n, budget_f, layerwise):
    """A latent layer (one row per token for every KV head) among per-head layers: the oracle loops over the
    latent layer's heads taking the max per token, then the brute force prunes (layer, row, token) units."""
    g = torch.Generator().manual_seed(7 + budget_n + layerwise)
    latent = torch.rand(3, 4, generator=g) * 2  # [Hk, n] per-head scores of the latent layer
    dense = torch.rand(2, 4, generator=g)
    pooled = torch.tensor([[max(float(latent[h, j]) for h in range(3)) for j in range(4)]])
    assert torch.equal(pool_latent(latent), pooled)
    got = keep_sets([pool_latent(latent), dense], 1, budget_n, budget_f, layerwise)
    want = brute_force([pooled, dense], 1, budget_n, budget_f, layerwise)
    assert [tuple(s.shape) for s in got] == [(1, 4), (2, 4)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    units = 4 + 8  # 4 latent tokens + 2 heads x 4 pairs
    drop = (pruned_count(4, budget_n, budget_f, 4) + pruned_count(8, budget_n, budget_f, 4) if layerwise
            else pruned_count(units, budget_n, budget_f, 4))
    assert sum(int(s.sum()) for s in got) == units - drop > 0
    assert got[0][0, 0] and got[1][:, 0].all()  # the sink


def test_pruned_count_is_kvpress_int_of_numel_times_ratio():
    # kvpress: int(score_val.numel() * compression_ratio), compression_ratio = 1 - budget
    for numel in (30 * 3 * 993, 30 * 3 * 1019, 7):
        for f in (0.5, 0.25):
            assert pruned_count(numel, 0, f, numel) == int(numel * (1.0 - f))
    assert pruned_count(12, 2, 0.0, 4) == 6  # 3 (layer, head) rows keep 2 of 4 tokens each
    assert pruned_count(12, 9, 0.0, 4) == 0  # a token budget above the length keeps everything
    assert pruned_count(12, 0, 1.0, 4) == 0  # the exact setting
