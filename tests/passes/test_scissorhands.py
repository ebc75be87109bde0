"""Scissorhands (``passes/scissorhands.py``, ``ops/policy_scissorhands.py``): exact setting, budget, loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

import graphwright as gw
from graphwright import RecipeError
from graphwright.ops.policy_scissorhands import EVICT_SCISSORHANDS, popcount, ring_bytes
from tests.conftest import _tiny
from tests.passes.stateful_helpers import assert_covering_budget_is_dense, assert_lowrank_kv_and_steer_compose, drive, generate_tiny, kept, softmax

SCALE = 1 / math.sqrt(8)


def _state(history, B=2, Hk=2):
    return [torch.zeros(B, Hk, 0, ring_bytes(history), dtype=torch.uint8), torch.zeros(B, Hk, 0, dtype=torch.int32),
            torch.zeros(B, Hk, 0, dtype=torch.long)]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_budget_covering_the_total_length_is_identity(model):
    assert_covering_budget_is_dense("scissorhands(budget=46)", model)  # 14 + 32
    small, _, _, _ = generate_tiny("scissorhands(budget=12, recent=2)", model)
    assert small.last_stats["kv_bytes"] < 0.5 * small.last_stats["kv_bytes_dense"]
    assert max(n for layer in small.last_stats["kept_tokens_per_head"] for row in layer for n in row) == 11


def test_ring_bits_pack_and_count():
    bits = torch.tensor([[0b10110001, 0b1], [0, 255]], dtype=torch.uint8)
    assert popcount(bits).tolist() == [5, 8]
    assert ring_bytes(400) == 50 and ring_bytes(13) == 2 and ring_bytes(8) == 1


@pytest.mark.parametrize("budget, history, recent, sinks", [(9, 13, 3, 0), (8, 400, 2, 2), (6, 1, 1, 1)])
def test_kept_sets_equal_a_python_loop_oracle(budget, history, recent, sinks):
    """Batch 2 ragged (prompts 10 and 6), 250 decode steps; histories as Python lists per (row, head, token)."""
    steps, lengths, H, Hk, g, B = 250, (10, 6), 4, 2, 2, 2

    def op(q, k, v, q_pos, k_pos, bits, count, step):
        return EVICT_SCISSORHANDS(q, k, v, q_pos, k_pos, bits, count, step, SCALE, budget, history, recent, sinks)

    oracle = [[{} for _ in range(Hk)] for _ in range(B)]  # pos -> list of the last `history` indicators
    drops = 0
    for i, _q, q_pos, _k_in, outs, (Q, K) in drive(op, _state(history), steps, lengths, H, Hk):
        if i == 0:
            QK = torch.einsum("bhpd,bhsd->bhps", Q.double(), K.double().repeat_interleave(g, dim=1)) * SCALE
        for b in range(B):
            L = int(q_pos[b].max()) + 1
            for h in range(Hk):
                hist = oracle[b][h]
                for p in q_pos[b].tolist():
                    if p >= 0:
                        hist[p] = []
                n = len(hist)
                total = {p: 0.0 for p in hist}
                rows = {p: 0 for p in hist}
                for qp in q_pos[b].tolist():
                    if qp < 0:
                        continue
                    vis = sorted(p for p in hist if p <= qp)
                    for p in vis:
                        rows[p] += 1
                    for hq in range(h * g, (h + 1) * g):
                        for p, x in zip(vis, softmax([float(QK[b, hq, qp, p]) for p in vis])):
                            total[p] += x / g
                for p in hist:
                    hist[p] = (hist[p] + [int(total[p] / rows[p] >= 1.0 / n)])[-history:]
                imp = {p: sum(v) / len(v) for p, v in hist.items()}
                cand = sorted((p for p in hist if p >= sinks and p < L - recent), key=lambda p: (imp[p], p))
                for p in cand[:max(n - (budget - 1), 0)]:
                    del hist[p]
                    drops += 1
                assert kept(outs[2], b, h) == sorted(hist), (i, b, h)
                assert len(hist) <= max(budget - 1, sinks + recent)
                counts = {int(p): int(c) for p, c in zip(outs[2][b, h], outs[4][b, h]) if p >= 0}
                ones = {int(p): int(c) for p, c in zip(outs[2][b, h], popcount(outs[3][b, h])) if p >= 0}
                assert counts == {p: len(v) for p, v in hist.items()}
                assert ones == {p: sum(v) for p, v in hist.items()}
    assert drops > steps  # eviction really ran at every decode step


def test_ties_drop_the_oldest_unprotected():
    """Prefill of 6 tokens, budget 4 (keep 3), sink 0 and the last token protected.

    Queries are equal and key 5 dominates, so row t < 5 spreads 1/(t+1) over keys 0..t and row 5 puts
    ~all its mass on key 5. Mean attention over the rows that see a key, against 1/6: key 1 0.257,
    key 2 0.196 (>= 1/6: importance 1), key 3 0.15, key 4 0.1 (importance 0). Three drops: 3 and 4
    (zeros, oldest first), then 1 (the older of the tie at 1).
    """
    B, H, Hk, S, D = 1, 2, 1, 6, 4
    k = torch.zeros(B, Hk, S, D)
    k[..., -1, :] = 10.0
    q = torch.ones(B, H, S, D)
    q_pos = torch.arange(S)[None]
    k_pos = q_pos[:, None].clone()
    bits, count, step = _state(8, B, Hk)
    out = EVICT_SCISSORHANDS(q, k, k.clone(), q_pos, k_pos, bits, count, step, 1.0, 4, 8, 1, 1)
    assert kept(out[2], 0, 0) == [0, 2, 5]
    assert popcount(out[3][0, 0]).tolist() == [1, 1, 1] and out[4][0, 0].tolist() == [1, 1, 1]
    assert out[5].tolist() == [[[1]]]


def test_budget_below_protected_tokens_is_refused():
    with pytest.raises(RecipeError, match=r"budget >= sinks \+ recent \+ 1"):
        gw.compile(_tiny("tiny-llama"), recipe="scissorhands(budget=10, recent=10)")
    with pytest.raises(RecipeError, match="budget"):
        gw.compile(_tiny("tiny-llama"), recipe="scissorhands(budget=0)")


def test_composes_with_lowrank_kv_and_steer():
    assert_lowrank_kv_and_steer_compose("scissorhands(budget=30)", "scissorhands(budget=8, recent=2, history=8)", 0.8,
                                              "scissorhands(budget=8, recent=2)")
