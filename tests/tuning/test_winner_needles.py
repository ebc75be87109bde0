"""Calibration needles are not the long suite's cases; the winner can be chosen by needles; --enqueue on the CLI."""

from __future__ import annotations

import argparse

import pytest

from graphwright.cli.cmd_tune import enqueue_arg
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.eval.niah import needle_suite
from graphwright.tuning.objectives import needle_seed
from graphwright.tuning.report import pick_winner
from graphwright.tuning.study import tune


def test_calibration_and_heldout_needles_share_no_case_with_the_suite():
    tok = ByteTokenizer()
    suite = needle_suite(tok, lengths=(600,), cases=6, seed=0)  # the long suite's default seed
    cal = needle_suite(tok, lengths=(600,), cases=6, seed=needle_seed("calibration", 0))
    held = needle_suite(tok, lengths=(600,), cases=6, seed=needle_seed("heldout", 0))
    prompts = [{c["prompt"] for c in s} for s in (suite, cal, held)]
    assert all(len(p) == 6 for p in prompts)
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert [c["depth"] for c in cal] == [c["depth"] for c in suite]  # same depths, other haystacks / needles
    assert needle_seed("calibration", 3) == "tune-calibration-3"
    with pytest.raises(ValueError, match="split must be one of"):
        needle_seed("test", 0)


def test_winner_by_needles_or_by_perplexity():
    front = [{"number": 0, "kv_fraction": 0.2, "ppl_ratio": 1.05, "niah": 0.5},
             {"number": 1, "kv_fraction": 0.24, "ppl_ratio": 1.10, "niah": 0.75},
             {"number": 2, "kv_fraction": 0.22, "ppl_ratio": 1.08, "niah": 0.75}]
    assert pick_winner(front)["number"] == 0  # the default: lowest perplexity ratio
    assert pick_winner(front, "niah")["number"] == 2  # most needles, then the lower perplexity ratio
    with pytest.raises(ValueError, match="winner must be one of"):
        pick_winner(front, "speed")
    with pytest.raises(ValueError, match="needs needle accuracy"):
        pick_winner([{**front[0], "niah": None}], "niah")
    with pytest.raises(ValueError, match="winner='niah' picks by calibration needle accuracy"):
        tune("tiny-llama", template="streaming(sinks=4)", winner="niah", outputs=False)
    with pytest.raises(ValueError, match="winner must be one of"):
        tune("tiny-llama", template="streaming(sinks=4)", winner="best", outputs=False)


def test_cli_enqueue_takes_json_points():
    assert enqueue_arg('{"0.duo.retrieval": 0.25, "0.duo.window": 64}') == {"0.duo.retrieval": 0.25, "0.duo.window": 64}
    for bad, msg in [("{0.duo: 1}", "is not JSON"), ("[1, 2]", "non-empty JSON object"), ("{}", "non-empty JSON object")]:
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            enqueue_arg(bad)
