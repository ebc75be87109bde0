"""Compile-time verification runs prefill plus decode steps, so eviction is measured; degenerate budgets are refused.

Invariants: a setting that keeps no token (``h2o(heavy=0, recent=0)``, ``fastgen(recovery=0)``,
``window(size=1, sinks=0)``) is a ``RecipeError`` before any work; a small-budget eviction pass,
whose prefill is dense, leaves the probe's prefill logits untouched and moves its decode-step
logits (the deviation verification reports is measured there, with the cache holding fewer tokens
than were fed); a near-zero legal budget gives a ``BudgetWarning`` carrying that deviation; a torch
slot-eviction kernel broken on purpose (monkeypatched) is caught, by the exact-pass check at
``h2o(heavy=1.0)`` and by the lowering check against the reference backend at a lossy setting.
"""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright import GraphwrightError, RecipeError
from graphwright.codegen.backends import TORCH
from graphwright.codegen.torch.eviction_slots import SLOT_OVERRIDES, h2o_slots
from graphwright.passes.base import instantiate
from graphwright.passes.budgets import BudgetWarning, budget_of, first_length_acting
from graphwright.recipes import Recipe
from graphwright.verify import PROBE_LEN, PROBE_MAX_LEN, make_probe, probe_length, probe_logits, run_recipe


@pytest.fixture(scope="module")
def sg():
    return gw.capture(gw.load_model("tiny-llama")[0])


@pytest.mark.parametrize("recipe, message", [
    ("h2o(heavy=0, recent=0)", r"pass h2o: h2o\(heavy=0, recent=0\) keeps no token"),
    ("h2o(heavy=0.0, recent=0)", r"pass h2o: h2o\(heavy=0.0, recent=0\) keeps no token"),
    ("fastgen(recovery=0)", r"pass fastgen: fastgen\(recovery=0.0\) gives every head the cheapest policy"),
    ("window(size=1, sinks=0)", r"pass window: window\(size=1, sinks=0\) lets every token see only itself"),
])
def test_settings_that_keep_no_token_are_refused(sg, recipe, message):
    with pytest.raises(RecipeError, match=message):
        run_recipe(sg, "noop + " + recipe)


def test_argument_minimums_already_refuse_zero_windows_and_budgets(sg):
    for recipe in ("streaming(sinks=0, window=0)", "snapkv(budget=0)"):
        with pytest.raises(RecipeError):
            run_recipe(sg, recipe)


def test_probe_length_exceeds_every_budget():
    assert first_length_acting(8, 0.0) == 9 and first_length_acting(0, 0.1) == 1 and first_length_acting(4, 0.5) == 9
    assert first_length_acting(0, 1.0) is None
    assert probe_length("h2o(heavy=4, recent=4)") == PROBE_LEN  # 9 + 3 padding + 4 < 16
    assert probe_length("snapkv(budget=40, window=8)") == 41 + 3 + 4
    assert probe_length("streaming(sinks=4, window=40) + lowrank_kv(keep=0.5)") == 45 + 3 + 4
    assert probe_length("streaming") == PROBE_MAX_LEN  # sinks + window = 2004: capped
    assert budget_of(instantiate(Recipe.parse("h2o(heavy=1.0)"))[0]).acts_after is None  # exact setting


@pytest.mark.parametrize("recipe", ["h2o(heavy=2, recent=2)", "snapkv(budget=6, window=2)", "streaming(sinks=2, window=6)"])
def test_small_budget_deviation_is_measured_on_decode_steps(sg, recipe):
    new, _, verification = run_recipe(sg, recipe)
    record = verification["passes"][0]
    assert verification["probe"] == {"batch": 2, "prompt_tokens": 16, "decode_steps": 4, "left_padding": 3, "uncrossed": {}}
    assert record["exact"] is False and record["decode_max_abs_logit_diff"] > 0.1 and record["decode_kl"] > 1e-3
    assert record["max_abs_logit_diff"] == record["decode_max_abs_logit_diff"]  # all of it comes from decode steps
    assert record["kv_kept"] < 0.75  # the cache held fewer tokens than the probe fed
    probe = make_probe(sg)
    before, after = probe_logits(sg, probe), probe_logits(new, probe)
    real = probe.mask[:, :probe.prefill].bool()
    # prefill attention is dense (eviction acts after it): a prefill-only probe would have reported 0
    assert (before[:, :probe.prefill][real] - after[:, :probe.prefill][real]).abs().max() <= 1e-4
    assert (before[:, probe.prefill:] - after[:, probe.prefill:]).abs().max() > 0.1


def test_near_zero_budget_warns_with_the_measured_deviation(sg):
    with pytest.warns(BudgetWarning, match=r"pass h2o: h2o\(heavy=1, recent=0\) keeps about 1 token\(s\) per head .* "
                                           r"measured on the verification probe: max \|dlogit\| [0-9.]+, KL [0-9.]+ "
                                           r"\(decode steps after eviction: max \|dlogit\| [0-9.]+"):
        _, _, verification = run_recipe(sg, "h2o(heavy=1, recent=0)")
    assert "near zero" in verification["passes"][0]["warning"]


def _broken_h2o_slots(*args, **kwargs):
    """The torch backend's decode-time H2O kernel, but it zeroes every row's first value slot at each decode step
    (a full H2O layer attends every slot without a mask, so corrupting positions alone would not show)."""
    out = h2o_slots(*args, **kwargs)
    q_pos, v = args[3], out[1]
    if q_pos.shape[1] == 1:
        v[:, :, 0] = 0
    return out


def test_broken_slot_eviction_is_caught(sg, monkeypatch):
    key = next(op for op, fn in SLOT_OVERRIDES.items() if fn is h2o_slots)
    monkeypatch.setitem(TORCH.table, key, _broken_h2o_slots)
    with pytest.raises(GraphwrightError, match=r"pass h2o is exact but changed the probe logits"):
        run_recipe(sg, "h2o(heavy=1.0)")
    with pytest.raises(GraphwrightError, match=r"lowering to backend 'torch' \(vs the reference backend\) is exact but changed"):
        run_recipe(sg, "h2o(heavy=4, recent=4)")


def test_probe_decode_matches_generate_on_the_identity_graph(sg):
    """The probe's teacher-forced decode logits equal a full-prompt forward (the cache threading is exact)."""
    probe = make_probe(sg)
    streamed = probe_logits(sg, probe)
    full = probe_logits(sg, make_probe(sg, prefill=probe.ids.shape[1], decode=0))
    real = probe.mask.bool()
    assert streamed.shape == full.shape and (streamed[real] - full[real]).abs().max() <= 1e-4
    assert torch.isfinite(streamed[real]).all()


def test_verify_tokens_exercises_a_budget_the_default_probe_does_not_reach(tiny):
    """snapkv(budget=200) acts from 201 tokens: the default 128-token probe cannot exceed it and says so
    (``uncrossed``, kv_kept 1.0); ``verify_tokens=256`` makes the probe evict and measure it."""
    short = gw.compile(tiny("tiny-llama"), recipe="snapkv(budget=200)")
    assert short.verification["probe"]["prompt_tokens"] == 128
    assert short.verification["probe"]["uncrossed"] == {"snapkv": 201}
    assert short.verification["passes"][0]["kv_kept"] == 1.0
    long = gw.compile(tiny("tiny-llama"), recipe="snapkv(budget=200)", verify_tokens=256)
    assert long.verification["probe"]["prompt_tokens"] == 201 + 3 + 4 and long.verification["probe"]["uncrossed"] == {}
    assert long.verification["passes"][0]["kv_kept"] < 1.0
    with pytest.raises(ValueError, match=r"verify_tokens must be an int in \[16, 65536\]"):
        gw.compile(tiny("tiny-llama"), recipe="snapkv(budget=200)", verify_tokens=8)
