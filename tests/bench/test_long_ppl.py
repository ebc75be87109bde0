"""bench/long_ppl.py: budgets are fractions of the prefill; windows run interleaved, resume, and pair with dense."""

import json

import pytest

from graphwright.eval.journal import Journal
from tests.bench.bench_scripts import load_bench


def _mod():
    return load_bench("long_ppl")


def test_default_recipes_are_quarter_and_half_of_the_prefill():
    lp = _mod()
    assert lp.recipes_for(2048) == ['snapkv(budget=512, heads="scores", gamma=0.5)', 'snapkv(budget=1024, heads="scores", gamma=0.5)',
                                    "snapkv(budget=512)", "snapkv(budget=1024)"]
    assert lp.parse_args([]).windows == 4 and lp.parse_args([]).prefix == 2048


@pytest.mark.slow  # ~2 min on the loaded 2-core machine (a compile per label and window, 186 decode steps)
def test_tiny_run_interleaves_windows_resumes_and_pairs_with_dense(tmp_path):
    lp = _mod()
    journal = tmp_path / "cases.jsonl"
    argv = ["--model", "tiny-llama", "--windows", "2", "--window", "64", "--prefix", "32", "--journal", str(journal),
            "--out", str(tmp_path), "--recipes", "snapkv(budget={quarter})", "snapkv(budget=32)"]
    assert lp.main(argv) == 0
    order = [(k["case"], k["recipe"]) for k, _ in Journal(journal).records()]
    # window 0 for every label before window 1 (a stopped run holds the same windows for all)
    assert order == [("w0", "dense"), ("w0", "snapkv(budget=8)"), ("w0", "snapkv(budget=32)"),
                     ("w1", "dense"), ("w1", "snapkv(budget=8)"), ("w1", "snapkv(budget=32)")]
    lines = journal.read_text().splitlines()
    assert lp.main(argv) == 0 and journal.read_text().splitlines() == lines  # resumed: nothing ran again
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "suite.json").read_text())["rows"] if r["task"] == "ppl"}
    assert rows["snapkv(budget=32)"]["delta"] == 0.0 and rows["snapkv(budget=32)"]["n"] == 2  # budget = prefill: exact
    assert rows["snapkv(budget=32)"]["kv_fraction"] == 1.0
    # budget 8 of the 32-token prefill, then the 31 decode steps append: 39 of dense's 63 positions at the end
    assert abs(rows["snapkv(budget=8)"]["kv_fraction"] - 39 / 63) < 1e-9
    assert rows["snapkv(budget=8)"]["delta"] != 0.0 and rows["snapkv(budget=8)"]["n"] == 2
