"""Rank correlations of proxy vs held-out scores (``tuning.proxy_order``): hand-computed values and identities."""

from __future__ import annotations

import math
import random

import pytest

from graphwright.tuning.proxy_order import average_ranks, kendall_tau_b, proxy_order, spearman


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert average_ranks([3, 1, 2]) == [3, 1, 2]
    assert average_ranks([5, 5, 5]) == [2, 2, 2]


def test_monotone_maps_and_reversals():
    x = [0.1, 0.5, 0.3, 0.9, 0.7]
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)
    assert kendall_tau_b(x, [math.exp(v) for v in x]) == pytest.approx(1.0)
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert kendall_tau_b(x, [-v for v in x]) == pytest.approx(-1.0)


def test_hand_computed_values():
    # no ties: ranks x = 1..5, y = [2, 1, 4, 3, 5]; d^2 = 1+1+1+1+0 = 4; rho = 1 - 6*4/(5*24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # pairs: 10; discordant (1,2) and (3,4): C = 8, D = 2 -> tau = 6/10
    assert kendall_tau_b([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.6)
    # ties in x: x = [1, 1, 2], y = [1, 2, 3]: ranks x [1.5, 1.5, 3], y [1, 2, 3] -> Pearson = 0.8660...
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    # tau-b: C = 2 (0-2, 1-2), D = 0, tx = 1, ty = 0: 2 / sqrt((3-1)(3-0)) = 0.8165
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert spearman([1, 1, 1], [1, 2, 3]) is None and kendall_tau_b([1, 2, 3], [4, 4, 4]) is None


def test_spearman_equals_the_rank_difference_formula_without_ties():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(3, 9)
        x, y = rng.sample(range(100), n), rng.sample(range(100), n)
        rx, ry = average_ranks(x), average_ranks(y)
        d2 = sum((a - b) ** 2 for a, b in zip(rx, ry))
        assert spearman(x, y) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))


def test_proxy_order_pairs_common_recipes_and_refuses_too_few():
    out = proxy_order({"a": 0.5, "b": 0.75, "c": 1.0, "z": 0.0}, {"a": 0.6, "b": 0.58, "c": 0.9})
    assert out["n"] == 3 and out["recipes"] == ["a", "b", "c"]
    assert out["spearman"] == pytest.approx(0.5) and out["kendall_tau_b"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least 2 recipes scored on both sides"):
        proxy_order({"a": 1.0}, {"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="two equally long sequences"):
        spearman([1, 2], [1])
    with pytest.raises(ValueError, match="must not be NaN"):
        kendall_tau_b([1, float("nan")], [1, 2])
