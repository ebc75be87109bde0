"""Finch (doi 10.1162/tacl_a_00716): the registered op's kept sets equal slow loop oracles on random attention."""

from __future__ import annotations

import math

import pytest

from tests.ops.scorer_oracles import call_op, kept, prefill_step, select_oracle, snapkv_oracle
from tests.passes.eviction_helpers import probs_oracle

SCALE = 0.35


def finch_oracle(q, k, q_pos, k_pos, scale, window, pool="mean"):
    """kvpress FinchPress.score in loops: window row i (of w) times (L - w + i), mean over rows, then over g."""
    P = probs_oracle(q, k, q_pos, k_pos, scale)
    B, H, T, S = P.shape
    Hk = k.shape[1]
    g = H // Hk
    out = []
    for b in range(B):
        L = max(int(p) for p in q_pos[b]) + 1
        rows = []
        for hk in range(Hk):
            row = []
            for s in range(S):
                if not 0 <= int(k_pos[b, hk, s]) < L - window:
                    row.append(0.0)
                    continue
                per_head = [sum(float(P[b, hk * g + j, T - window + i, s]) * (L - window + i) for i in range(window)) / window
                            for j in range(g)]
                row.append(max(per_head) if pool == "max" else sum(per_head) / g)
            rows.append(row)
        out.append(rows)
    return out


def finch_chunk_oracle(score, k_pos, q_pos, budget_n, window, chunk, sinks=0):
    """Per chunk of positions [c*chunk, (c+1)*chunk): max(1, floor(n_c * cap / L)) kept, protected tokens first."""
    B, Hk, S = k_pos.shape
    out = []
    for b in range(B):
        L = max(int(p) for p in q_pos[b]) + 1
        rows = []
        for h in range(Hk):
            slots = [s for s in range(S) if k_pos[b, h, s] >= 0]
            keep = []
            for c in sorted({int(k_pos[b, h, s]) // chunk for s in slots}):
                inside = [s for s in slots if int(k_pos[b, h, s]) // chunk == c]
                share = max(1, math.floor(len(inside) * budget_n / L))
                prot = [s for s in inside if k_pos[b, h, s] < sinks or k_pos[b, h, s] >= L - window]
                cand = sorted((s for s in inside if s not in prot), key=lambda s: (-float(score[b][h][s]), s))
                keep += prot + cand[:max(share - len(prot), 0)]
            rows.append(sorted(int(k_pos[b, h, s]) for s in keep))
        out.append(rows)
    return out


@pytest.mark.parametrize("window,budget,pool,sinks", [(3, 7, "mean", 0), (4, 8, "max", 0), (2, 6, "mean", 2), (8, 10, "mean", 0),
                                                     (9, 11, "max", 1)])
def test_finch_matches_the_loop_oracle(window, budget, pool, sinks):
    q, k, v, q_pos, k_pos = prefill_step(T=14, seed=21)
    out = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="finch", when="prefill", budget_n=budget, window=window,
                  pool=pool, sinks=sinks)
    score = finch_oracle(q, k, q_pos, k_pos, SCALE, window, pool)
    want = select_oracle(score, k_pos, q_pos, budget, window=window, sinks=sinks)
    assert kept(out[2]) == want
    assert all(len(h) == budget for row in want for h in row)  # something was evicted, the budget is met
    for b, L in enumerate((14, 11)):
        assert all(set(range(L - window, L)) <= set(h) for h in kept(out[2])[b])  # the question is always kept


def test_finch_is_not_snapkv_the_position_weights_matter():
    """Same window, no pooling: the unweighted SnapKV sum keeps other sets (so the weights are tested)."""
    q, k, v, q_pos, k_pos = prefill_step(T=24, seed=22, pad=(0, 0))
    fin = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="finch", when="prefill", budget_n=10, window=6)
    snap = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="snapkv", when="prefill", budget_n=10, window=6, kernel=1)
    assert kept(snap[2]) == select_oracle(snapkv_oracle(q, k, q_pos, k_pos, SCALE, 6, 1), k_pos, q_pos, 10, window=6)
    assert kept(fin[2]) != kept(snap[2])


@pytest.mark.parametrize("chunk,budget,window,sinks", [(5, 7, 2, 0), (4, 6, 3, 1), (7, 12, 2, 0)])
def test_finch_chunked_selection_matches_the_oracle(chunk, budget, window, sinks):
    q, k, v, q_pos, k_pos = prefill_step(T=14, seed=23)
    out = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="finch", when="prefill", budget_n=budget, window=window,
                  chunk=chunk, sinks=sinks)
    score = finch_oracle(q, k, q_pos, k_pos, SCALE, window)
    assert kept(out[2]) == finch_chunk_oracle(score, k_pos, q_pos, budget, window, chunk, sinks)
    assert kept(out[2]) != kept(call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="finch", when="prefill",
                                        budget_n=budget, window=window, sinks=sinks)[2])


@pytest.mark.parametrize("chunk", [0, 4])
def test_finch_budget_at_least_the_length_keeps_everything(chunk):
    """Exact setting: budget >= prompt length keeps every token (both rows, every head)."""
    q, k, v, q_pos, k_pos = prefill_step(T=14, seed=24)
    out = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="finch", when="prefill", budget_n=14, window=3, chunk=chunk)
    assert kept(out[2]) == kept(k_pos)
    out = call_op(q, k, v, q_pos, k_pos, scale=SCALE, scorer="finch", when="prefill", budget_f=1.0, window=3, chunk=chunk)
    assert kept(out[2]) == kept(k_pos)
