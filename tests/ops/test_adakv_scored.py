"""Ada-KV budgets for any prefill scorer (``ops/adakv_scored.py``): per-head counts and kept sets equal a slow loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

from graphwright.ops.adakv_ref import adakv_reference, pack_heads_reference, packed_positions_reference
from graphwright.ops.adakv_scored import EVICT_ADAKV_SCORED
from tests.ops.scorer_oracles import (
    expected_attention_oracle,
    kept,
    keydiff_oracle,
    knorm_oracle,
    prefill_step,
    snapkv_oracle,
)

SCALE = 0.35
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))


def call(q, k, v, q_pos, scorer, budget_n=0, budget_f=0.0, floor=0.2, sinks=0, window=0, kernel=1, chunk=0,
         inv_freq=None, n_future=16):
    hk = k.shape[1]
    kp = packed_positions_reference(q_pos, hk)
    return EVICT_ADAKV_SCORED(q, pack_heads_reference(k), pack_heads_reference(v), q_pos, kp, inv_freq, SCALE, scorer,
                              budget_n, budget_f, floor, sinks, window, kernel, "avg", "mean", chunk, "sum", n_future,
                              0.0, 1.0, 0, 1, None, 0.5)


def packed_kept(k_pos):
    """[B][Hk] sorted positions held by each head in the packed output."""
    return kept(k_pos)


def adaptive_oracle(score, q_pos, S, Hk, cap_n, cap_f, floor, sinks, window, minmax, chunk=0):
    """Loop: (score, h, j) list per row, global top-(Hk*C), safeguard, per-head top-n_h (or top n_h // chunk chunks
    of the head-summed chunk means); returns ([B][Hk] kept positions, [B][Hk] counts n_h)."""
    out, counts = [], []
    for b in range(len(score)):
        pos = [int(p) for p in q_pos[b]]
        L = max(pos) + 1
        cap = cap_n + math.floor(cap_f * L + 1e-9)
        valid = [s for s in range(S) if pos[s] >= 0]
        prot = [s for s in valid if pos[s] < sinks or pos[s] >= L - window]
        cand = [s for s in valid if s not in prot]
        if L <= cap:
            out.append([sorted(pos[s] for s in valid)] * Hk)
            counts.append(None)
            continue
        c = max(0, cap - len(prot))
        sc = []
        for h in range(Hk):
            row = {s: float(score[b][h][s]) for s in cand}
            if minmax:
                lo, hi = min(row.values()), max(row.values())
                row = {s: (x - lo) / (hi - lo) if hi > lo else 1.0 for s, x in row.items()}
            sc.append(row)
        entries = sorted(((-sc[h][s], h, s) for h in range(Hk) for s in cand))[:Hk * c]
        n = [sum(1 for e in entries if e[1] == h) for h in range(Hk)]
        n = [min(len(cand), math.floor((1 - floor) * n[h] + floor * c + 0.5)) for h in range(Hk)]
        rows = []
        for h in range(Hk):
            if chunk and n[h] < len(cand):
                means = {}
                for hh in range(Hk):
                    groups = {}
                    for s in cand:
                        groups.setdefault(pos[s] // chunk, []).append(sc[hh][s])
                    for cid, xs in groups.items():
                        means[cid] = means.get(cid, 0.0) + sum(xs) / len(xs)
                top = sorted(means, key=lambda cid: (-means[cid], cid))[:max(1, n[h] // chunk) if n[h] else 0]
                best = [s for s in cand if pos[s] // chunk in top]
            else:
                best = sorted(cand, key=lambda s: (-sc[h][s], s))[:n[h]]
            rows.append(sorted(pos[s] for s in prot + best))
        out.append(rows)
        counts.append(n)
    return out, counts


@pytest.mark.parametrize("budget_n,budget_f,sinks,window", [(6, 0.0, 0, 0), (7, 0.0, 1, 2), (0, 0.5, 0, 2)])
@pytest.mark.parametrize("floor", [0.0, 0.2])
def test_key_scorers_match_the_loop_oracle(budget_n, budget_f, sinks, window, floor):
    q, k, v, q_pos, k_pos = prefill_step(Hk=3, H=6, T=14, seed=11)
    for name, score in (("knorm", knorm_oracle(k)), ("keydiff", keydiff_oracle(k, k_pos))):
        out = call(q, k, v, q_pos, name, budget_n, budget_f, floor, sinks, window)
        want, counts = adaptive_oracle(score, q_pos, 14, 3, budget_n, budget_f, floor, sinks, window, minmax=True)
        assert packed_kept(out[2]) == want, name
        assert any(len(set(c)) > 1 for c in counts if c), name  # the split is really adaptive here
        assert out[0].shape[1] == 1 and out[0].shape[2] == max(sum(len(h) for h in row) for row in want)


def test_snapkv_and_expected_attention_match_the_loop_oracle():
    q, k, v, q_pos, k_pos = prefill_step(Hk=2, H=4, T=12, seed=12)
    sn = snapkv_oracle(q, k, q_pos, k_pos, SCALE, 3, 3)
    out = call(q, k, v, q_pos, "snapkv", 7, window=3, kernel=3, floor=0.0)
    assert packed_kept(out[2]) == adaptive_oracle(sn, q_pos, 12, 2, 7, 0.0, 0.0, 0, 3, minmax=False)[0]
    ea = expected_attention_oracle(q, k, v, q_pos, k_pos, SCALE, INV_FREQ, 1.0, 2, 16)
    out = call(q, k, v, q_pos, "expected_attention", 6, sinks=2, floor=0.2, inv_freq=INV_FREQ)
    assert packed_kept(out[2]) == adaptive_oracle(ea, q_pos, 12, 2, 6, 0.0, 0.2, 2, 0, minmax=False)[0]


def test_chunkkv_matches_the_loop_oracle():
    q, k, v, q_pos, k_pos = prefill_step(Hk=2, H=4, T=16, pad=(0, 0), seed=13)
    sn = snapkv_oracle(q, k, q_pos, k_pos, SCALE, 2, 1)
    out = call(q, k, v, q_pos, "snapkv", 8, window=2, chunk=2, floor=0.0)
    want, counts = adaptive_oracle(sn, q_pos, 16, 2, 8, 0.0, 0.0, 0, 2, minmax=False, chunk=2)
    assert packed_kept(out[2]) == want


@pytest.mark.parametrize("floor", [0.0, 0.5])
def test_snapkv_scorer_equals_snapkv_heads_adaptive(floor):
    q, k, v, q_pos, _ = prefill_step(Hk=2, H=4, T=12, seed=14)
    a = call(q, k, v, q_pos, "snapkv", 7, window=3, kernel=5, floor=floor)
    kp = packed_positions_reference(q_pos, 2)
    b = adakv_reference(q, pack_heads_reference(k), pack_heads_reference(v), q_pos, kp, SCALE, 7, 3, 5, "avg", True,
                        floor, 0, 1, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("scorer", ["knorm", "keydiff", "snapkv"])
def test_budget_at_least_length_and_floor_one(scorer):
    q, k, v, q_pos, _ = prefill_step(Hk=2, H=4, T=12, seed=15)
    pk, pv, kp = pack_heads_reference(k), pack_heads_reference(v), packed_positions_reference(q_pos, 2)
    out = call(q, k, v, q_pos, scorer, 12, window=2)  # row 0 unpadded: bit-identical; row 1: padding dropped only
    assert torch.equal(out[0][0], pk[0]) and torch.equal(out[1][0], pv[0]) and torch.equal(out[2][0], kp[0])
    assert kept(out[2]) == kept(kp)
    uni = call(q, k, v, q_pos, scorer, 6, window=2, floor=1.0)  # floor = 1: every head keeps C = 4 + window
    assert all(len(h) == 6 for row in packed_kept(uni[2]) for h in row)


def test_decode_appends():
    q, k, v, q_pos, _ = prefill_step(Hk=2, H=4, T=12, seed=16)
    out = call(q, k, v, q_pos, "knorm", 6)
    q1 = q[:, :, -1:]
    pos1 = q_pos[:, -1:] + 1
    k_all = torch.cat([out[0], pack_heads_reference(k[:, :, -1:])], 2)
    v_all = torch.cat([out[1], pack_heads_reference(v[:, :, -1:])], 2)
    kp_all = torch.cat([out[2], packed_positions_reference(pos1, 2)], 2)
    again = EVICT_ADAKV_SCORED(q1, k_all, v_all, pos1, kp_all, None, SCALE, "knorm", 6, 0.0, 0.2, 0, 0, 1, "avg", "mean",
                               0, "sum", 16, 0.0, 1.0, 0, 1, None, 0.5)
    assert torch.equal(again[0], k_all) and torch.equal(again[2], kp_all)
