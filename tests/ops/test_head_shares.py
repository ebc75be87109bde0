"""Per-head budget shares (``ops/head_shares.py``): a slow loop oracle of the spec, the exact settings, the limits."""

from __future__ import annotations

import math
import random

import pytest

from graphwright.ops.head_shares import head_shares, share_weights


def oracle(weights, total, cap, floor):
    """The spec written out: bisection on lam (log scale) for sum clip(lam * w_i, floor, cap) = total, then
    floor(x_i) and +1 to the largest fractional parts (ties: lower index), one head at a time."""
    h = len(weights)
    floor = min(floor, cap)
    total = max(h * floor, min(total, h * cap))

    def filled(lam):
        s = 0.0
        for w in weights:
            s += min(cap, max(floor, lam * w))
        return s

    lo, hi = -800.0, 800.0  # log lam
    for _ in range(400):
        mid = (lo + hi) / 2
        if filled(math.exp(mid)) < total:
            lo = mid
        else:
            hi = mid
    lam = math.exp(hi)
    x = [min(cap, max(floor, lam * w)) for w in weights]
    out = [math.floor(v + 1e-9) for v in x]
    frac = [(v - o) if v - o > 1e-9 else 0.0 for v, o in zip(x, out)]
    left = total - sum(out)
    while left > 0:
        best = None
        for i in range(h):
            if best is None or frac[i] > frac[best]:
                best = i
        out[best] += 1
        frac[best] = -1.0
        left -= 1
    return tuple(out)


@pytest.mark.parametrize("seed", range(40))
def test_equals_loop_oracle(seed):
    rng = random.Random(seed)
    h = rng.randint(1, 40)
    scores = [rng.choice([0.0, 0.0, rng.random(), rng.random() ** 3]) for _ in range(h)]
    weights = share_weights(scores, rng.choice([0.0, 0.5, 1.0, 2.0, 5.0, 30.0]), rng.choice([1e-3, 0.01, 0.1]))
    cap = rng.randint(1, 300)
    floor = rng.randint(0, cap)
    total = rng.randint(0, h * cap + 50)
    got = head_shares(weights, total, cap, floor)
    assert got == oracle(weights, total, cap, floor)
    assert sum(got) == max(h * min(floor, cap), min(total, h * cap))
    assert all(min(floor, cap) <= g <= cap for g in got)


def test_gamma_zero_is_uniform_and_caps_redistribute():
    w0 = share_weights([0.9, 0.0, 0.3, 0.05], 0.0, 0.01)
    assert w0 == (1.0, 1.0, 1.0, 1.0)
    assert head_shares(w0, 4 * 256, 1024, 51) == (256, 256, 256, 256)
    # large gamma: the top head fills to its prompt length, the next takes the rest, the others keep the floor
    w = share_weights([0.9, 0.0, 0.3, 0.05], 30.0, 0.01)
    assert head_shares(w, 4 * 256, 600, 51) == (600, 51, 322, 51)
    # gamma 1: proportional above the floor, the excess of a capped head redistributed in proportion
    w1 = share_weights([1.0, 1.0, 0.5], 1.0, 1e-6)
    got = head_shares(w1, 300, 120, 10)
    assert got == (120, 120, 60)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="gamma >= 0"):
        share_weights([0.1], -1.0, 0.01)
    with pytest.raises(ValueError, match="positive weights"):
        head_shares((), 10, 5, 1)
