"""Sampling arguments are checked before any step runs (issue 19, item 11).

Invariant: a bad ``temperature``/``top_k``/``top_p``/``seed``/``do_sample`` is a ``ValueError`` naming the
argument and its allowed range, never an error from inside torch nor a silently accepted value.
"""

from __future__ import annotations

import math

import pytest
import torch

from graphwright.runtime.sampling import MAX_SEED, check_sampling

BAD = [
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"temperature": 0.0}, "temperature must be > 0 when sampling"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": 1.5}, "top_k must be an integer, None or >= 0"),
    ({"top_k": -5}, "top_k must be an integer, None or >= 0"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"seed": "abc"}, "seed must be an integer, None or in"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": MAX_SEED + 1}, "seed must be an integer"),
    ({"seed": 1.0}, "seed must be an integer"),
    ({"do_sample": "yes"}, "do_sample must be True or False"),
]


def args(**kw):
    base = {"do_sample": True, "temperature": 1.0, "top_k": None, "top_p": 1.0, "seed": None}
    base.update(kw)
    return base


@pytest.mark.parametrize("kw,match", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_sampling_argument_is_a_value_error_naming_it(kw, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(**args(**kw))


def test_greedy_accepts_temperature_zero_and_still_checks_the_rest():
    assert check_sampling(**args(do_sample=False, temperature=0)) == (False, 0.0, None, 1.0, None)
    with pytest.raises(ValueError, match="top_p"):
        check_sampling(**args(do_sample=False, top_p=2.0))


def test_good_values_pass_through():
    assert check_sampling(**args(top_k=0, top_p=0.5, seed=MAX_SEED, temperature=2)) == (True, 2.0, 0, 0.5, MAX_SEED)


@pytest.mark.parametrize("kw,match", BAD[:3] + BAD[5:6] + BAD[8:9] + BAD[11:12], ids=lambda x: str(x)[:30])
def test_generate_refuses_before_running(compiled_tiny, kw, match):
    cm = compiled_tiny("tiny-llama")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=match):
        cm.generate(ids, max_new_tokens=2, **args(**kw))


def test_generate_with_checked_values_samples_reproducibly(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids = torch.tensor([[5, 6, 7]])
    a = cm.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    b = cm.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    assert a.shape == (1, 7) and torch.equal(a, b)
