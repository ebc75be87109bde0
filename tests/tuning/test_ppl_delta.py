"""Perplexity-aware quality (``max_ppl_delta``): a constraint ``ppl_ratio <= 1 + x`` that the search and the front respect."""

from __future__ import annotations

import argparse

import optuna
import pytest

from graphwright.cli.cmd_tune import add_parser
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.models import load_model
from graphwright.tuning.report import pareto_front, pick_winner, to_markdown
from graphwright.tuning.study import STUDY_NAME, _storage, tune

TOK = ByteTokenizer()
SMALL = {"windows": 1, "window": 40, "prefix": 20}

ROWS = [{"number": 0, "recipe": "snapkv(budget=1)", "state": "COMPLETE", "kv_fraction": 0.10, "ppl_ratio": 1.12, "niah": 0.75},  # most needles, +12%
        {"number": 1, "recipe": "snapkv(budget=2)", "state": "COMPLETE", "kv_fraction": 0.15, "ppl_ratio": 1.04, "niah": 0.50},
        {"number": 2, "recipe": "snapkv(budget=3)", "state": "COMPLETE", "kv_fraction": 0.20, "ppl_ratio": 1.01, "niah": 0.25},
        {"number": 3, "recipe": "snapkv(budget=4)", "state": "COMPLETE", "kv_fraction": 0.30, "ppl_ratio": 1.00, "niah": 1.00},  # over the KV budget
        {"number": 4, "recipe": "snapkv(budget=5)", "state": "PRUNED", "kv_fraction": 0.05, "ppl_ratio": 1.00, "niah": 1.00}]


def test_front_keeps_only_trials_within_the_perplexity_delta():
    assert [r["number"] for r in pareto_front(ROWS, 0.25, niah=True)] == [0, 1, 2]
    assert [r["number"] for r in pareto_front(ROWS, 0.25, niah=True, max_ppl_delta=0.05)] == [1, 2]
    assert [r["number"] for r in pareto_front(ROWS, 0.25, niah=True, max_ppl_delta=0.01)] == [2]  # the bound is inclusive
    assert pareto_front(ROWS, 0.25, niah=True, max_ppl_delta=0.0) == []
    # quality = needles AND perplexity within 5%: the needle winner of the constrained front is trial 1, not trial 0
    assert pick_winner(pareto_front(ROWS, 0.25, niah=True), "niah")["number"] == 0
    assert pick_winner(pareto_front(ROWS, 0.25, niah=True, max_ppl_delta=0.05), "niah")["number"] == 1
    md = to_markdown(pareto_front(ROWS, 0.25, niah=True, max_ppl_delta=0.05), {"template": "snapkv", "budget": 0.25, "max_ppl_delta": 0.05})
    assert "perplexity at most 5% above dense" in md and "snapkv(budget=2)" in md and "snapkv(budget=1)" not in md


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


def test_study_sets_the_constraint_and_the_front_drops_what_breaks_it(llama, tmp_path):
    # tiny random Llama, 40-token window: streaming(sinks=1, window=2) raises perplexity over dense (ratio ~1.09),
    # wider windows lower it (the random model's perplexity drops under compression), so delta 0 splits the trials
    points = [{"0.streaming.window": w} for w in (2, 8, 16)]
    r = tune(llama, TOK, template="streaming(sinks=1)", budget=0.9, trials=3, population=3, out=tmp_path, eval_settings=SMALL,
             enqueue=points, max_ppl_delta=0.0)
    assert r["settings"]["max_ppl_delta"] == 0.0
    done = {t["params"]["0.streaming.window"]: t for t in r["trials"] if t["state"] == "COMPLETE"}
    assert sorted(done) == [2, 8, 16]
    assert done[2]["ppl_ratio"] > 1.0 and done[8]["ppl_ratio"] <= 1.0  # the split the test needs (measured, not assumed)
    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(tmp_path))
    for t in study.trials:  # feasible when <= 0 (Optuna's set_constraint)
        assert t.system_attrs["constraints:ppl_delta"] == pytest.approx(t.user_attrs["ppl_ratio"] - 1.0)
    unconstrained = pareto_front(r["trials"], 0.9)
    assert done[2]["number"] in {p["number"] for p in unconstrained}  # least KV: on the front without the constraint
    front = {p["number"] for p in r["pareto"]}
    assert front and done[2]["number"] not in front
    assert front == {p["number"] for p in pareto_front(r["trials"], 0.9, max_ppl_delta=0.0)}
    assert r["winner"]["calibration"]["ppl_ratio"] <= 1.0
    assert "perplexity at most 0% above dense" in (tmp_path / "pareto.md").read_text()


def test_bad_delta_is_refused_with_what_is_allowed(capsys):
    for bad in (-0.1, float("inf"), float("nan"), "0.05", True):
        with pytest.raises(ValueError, match="max_ppl_delta is the largest perplexity increase over dense allowed"):
            tune("tiny-llama", template="streaming(sinks=4)", max_ppl_delta=bad, outputs=False)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["tune", "--max-ppl-delta", "0.05"]).max_ppl_delta == 0.05
    assert parser.parse_args(["tune"]).max_ppl_delta is None
    with pytest.raises(SystemExit):
        parser.parse_args(["tune", "--max-ppl-delta", "-1"])
    assert "--max-ppl-delta: must be a number in [0, 1e+06]" in capsys.readouterr().err
