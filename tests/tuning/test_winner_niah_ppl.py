"""The "niah+ppl" winner: most calibration needles among front points within a perplexity-ratio cap, else lowest ppl."""

from __future__ import annotations

import argparse

import pytest

from graphwright.cli.cmd_tune import add_parser
from graphwright.tuning.report import WINNER_PPL_CAP, pick_winner
from graphwright.tuning.study import tune

FRONT = [{"number": 0, "kv_fraction": 0.18, "ppl_ratio": 1.14, "niah": 0.75},  # most needles, perplexity +14%
         {"number": 1, "kv_fraction": 0.20, "ppl_ratio": 1.04, "niah": 0.50},
         {"number": 2, "kv_fraction": 0.22, "ppl_ratio": 1.02, "niah": 0.50},
         {"number": 3, "kv_fraction": 0.24, "ppl_ratio": 1.01, "niah": 0.25}]


def test_needles_within_the_perplexity_cap_else_lowest_perplexity():
    assert WINNER_PPL_CAP == 1.05
    assert pick_winner(FRONT, "niah")["number"] == 0  # needles alone take the +14% point
    assert pick_winner(FRONT, "niah+ppl")["number"] == 2  # cap 1.05: 0 is out; 1 and 2 tie on needles, 2 has the lower ppl
    assert pick_winner(FRONT, "niah+ppl", ppl_cap=1.2)["number"] == 0  # a loose cap keeps the needle winner
    assert pick_winner(FRONT, "niah+ppl", ppl_cap=1.015)["number"] == 3  # only trial 3 is within 1.5%
    assert pick_winner(FRONT, "niah+ppl", ppl_cap=1.001)["number"] == 3  # none within: the lowest perplexity ratio
    assert pick_winner(FRONT[:2], "niah+ppl", ppl_cap=1.001)["number"] == 1
    assert pick_winner(FRONT, "ppl")["number"] == 3


def test_bad_caps_and_rules_name_what_is_allowed():
    for bad in (1.0, 0.9, float("nan"), float("inf"), "1.1", True):
        with pytest.raises(ValueError, match="winner_ppl_cap must be a finite perplexity ratio > 1"):
            pick_winner(FRONT, "niah+ppl", ppl_cap=bad)
    with pytest.raises(ValueError, match="ppl_cap applies to winner='niah\\+ppl' only"):
        pick_winner(FRONT, "niah", ppl_cap=1.1)
    with pytest.raises(ValueError, match="needs needle accuracy"):
        pick_winner([{**FRONT[0], "niah": None}], "niah+ppl")
    with pytest.raises(ValueError, match="non-empty Pareto front"):
        pick_winner([], "niah+ppl")
    with pytest.raises(ValueError, match="winner='niah\\+ppl' picks by calibration needle accuracy"):
        tune("tiny-llama", template="streaming(sinks=4)", winner="niah+ppl", outputs=False)
    with pytest.raises(ValueError, match="winner_ppl_cap applies to winner='niah\\+ppl' only"):
        tune("tiny-llama", template="streaming(sinks=4)", winner="niah", winner_ppl_cap=1.1, outputs=False,
             eval_settings={"niah_cases": 2})
    with pytest.raises(ValueError, match="winner_ppl_cap must be a finite"):
        tune("tiny-llama", template="streaming(sinks=4)", winner="niah+ppl", winner_ppl_cap=0.5, outputs=False,
             eval_settings={"niah_cases": 2})


def _parser():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser


def test_cli_takes_the_rule_and_its_cap(capsys):
    args = _parser().parse_args(["tune", "--model", "tiny-llama", "--winner", "niah+ppl", "--winner-ppl-cap", "1.1"])
    assert (args.winner, args.winner_ppl_cap) == ("niah+ppl", 1.1)
    assert _parser().parse_args(["tune", "--model", "tiny-llama"]).winner_ppl_cap is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["tune", "--model", "tiny-llama", "--winner", "niah+ppl", "--winner-ppl-cap", "1.0"])
    assert "--winner-ppl-cap: must be a number in (1, 1e+06]" in capsys.readouterr().err
