"""Long-context suite: seeded case generation, RULER scoring, bootstrap intervals, held-out split, CLI."""

import collections
import functools
import json
import pathlib
import re

import numpy as np
import pytest

from graphwright.errors import ModelLoadError
from graphwright.eval import data, ruler, stats
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.eval.niah import HAYSTACKS, TEMPLATES, encode, needle_suite
from graphwright.eval.perplexity import heldout_windows, long_perplexity


@functools.lru_cache(maxsize=None)
def _smol_tokenizer():
    from transformers import AutoTokenizer

    from graphwright.models.smollm2 import converted_folder

    return AutoTokenizer.from_pretrained(converted_folder())


@pytest.fixture
def tok():
    try:
        return _smol_tokenizer()
    except ModelLoadError as e:
        pytest.fail(f"the built-in tokenizer must load: {e}")


def test_needle_suite_counts_depths_templates_and_seed(tok):
    cases = needle_suite(tok, lengths=[300, 420], cases=7, seed=0)
    assert len(cases) == 14
    for length in (300, 420):
        mine = [c for c in cases if c["length"] == length]
        assert [c["depth"] for c in mine] == [i / 6 for i in range(7)]  # 0 .. 1 evenly
        assert {c["template"] for c in mine} == set(range(len(TEMPLATES))) and {c["haystack"] for c in mine} == set(HAYSTACKS)
        for c in mine:
            assert abs(len(encode(tok, c["prompt"]).input_ids) - length) <= 1
            needle = TEMPLATES[c["template"]][0].format(city=c["city"], activity=c["activity"])
            q = c["prompt"].index(TEMPLATES[c["template"]][1].format(city=c["city"]))
            assert c["prompt"].index(needle) < q  # the question comes after the context
            if c["haystack"] == "noise":
                assert "The grass is green." in c["prompt"]
    assert cases == needle_suite(tok, lengths=[300, 420], cases=7, seed=0)
    assert [c["prompt"] for c in cases] != [c["prompt"] for c in needle_suite(tok, lengths=[300, 420], cases=7, seed=1)]
    with pytest.raises(ValueError, match="templates must be"):
        needle_suite(tok, lengths=[300], cases=2, templates=[7])


def test_ruler_cases_fit_and_hold_their_answers(tok):
    cases = ruler.ruler_cases(tok, lengths=[640], cases=3, seed=5)
    assert [c["task"] for c in cases] == [t for t in ruler.TASKS for _ in range(3)]
    for c in cases:
        spec = ruler.SPECS[c["task"]]
        assert c["prompt_tokens"] == len(encode(tok, c["prompt"]).input_ids) <= 640 - spec["max_new_tokens"]
        assert c["prompt_tokens"] > 640 - spec["max_new_tokens"] - 80, c["id"]  # filled to within a unit or two
        body = c["prompt"][:c["prompt"].rindex("Question:")] if "Question:" in c["prompt"] else c["prompt"]
        if c["task"].startswith("niah"):
            assert len(c["references"]) == spec["values"] * spec["queries"] and c["chance"] == 0.0
            for v in c["references"]:
                assert body.count(f"is: {v}.") == 1
            needles = body.count("One of the special magic numbers for")
            assert needles == (spec["keys"] * spec["values"] if spec["haystack"] != "needle" else needles) and needles >= spec["keys"]
        elif c["task"] == "vt":
            a, *rest = c["references"]
            assert len(c["references"]) == 5 and f"VAR {a} = " in body
            assert all(f"VAR {b} = VAR {p}." in body for p, b in zip(c["references"], rest))
        else:
            listing = collections.Counter(re.findall(r"\d+\. ([a-z]+)", c["prompt"]))
            assert {listing[w] for w in c["references"]} == {6}  # under 4,096 tokens: common words 6 times, the rest once
            assert set(listing.values()) == {1, 6} and c["chance"] == 10 / len(listing)
    assert cases == ruler.ruler_cases(tok, lengths=[640], cases=3, seed=5)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.ruler_cases(tok, tasks=["qa_1"], lengths=[640], cases=1)


def test_string_match_all_and_above_chance():
    assert ruler.string_match_all(" 1234567, and 7654321.", ["1234567", "7654321"]) == 1.0
    assert ruler.string_match_all("ABCDE\x00fghij", ["abcde", "FGHIJ", "KLMNO", "zzzzz"]) == 0.5
    assert ruler.string_match_all("", ["x"]) == 0.0
    rows = [{"task": "a", "score": s, "chance": 0.0} for s in (1, 1, 0, 1, 1, 1, 0, 1)]
    rows += [{"task": "b", "score": s, "chance": 0.5} for s in (0.5, 0.4, 0.6, 0.5, 0.5, 0.5, 0.4, 0.6)]
    got = ruler.above_chance(rows)
    assert got["a"]["above"] and not got["b"]["above"]
    assert got["b"]["chance"] == 0.5 and got["a"]["score"]["mean"] == 0.75


def test_bootstrap_intervals_are_seeded_and_paired():
    x = np.random.default_rng(0).random(60)
    r = stats.bootstrap_mean(x, seed=3)
    assert r["lo"] < r["mean"] < r["hi"] and r["mean"] == pytest.approx(x.mean()) and r["n"] == 60
    assert r == stats.bootstrap_mean(x, seed=3) and r != stats.bootstrap_mean(x, seed=4)
    same = stats.paired_difference(x, x, seed=3)
    assert (same["mean"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    ratio = stats.paired_ppl_ratio(x, x)
    assert (ratio["ratio_minus_1"], ratio["lo"], ratio["hi"]) == (0.0, 0.0, 0.0)
    p = stats.perplexity_interval([1.0, 2.0, 3.0])
    assert p["lo"] <= p["ppl"] <= p["hi"] and p["ppl"] == pytest.approx(np.exp(2.0))
    with pytest.raises(ValueError, match="same cases"):
        stats.paired_difference([1, 2], [1, 2, 3])


def test_heldout_split_is_disjoint_from_what_calibration_reads():
    text = data.read_text()
    cal, held = data.calibration_part(), data.heldout_part()
    assert cal + held == text and held.startswith(held.lstrip()) and len(held) > 0.35 * len(text)
    from graphwright.passes.pipeline import calibration_text
    from graphwright.steer import tasks

    cal_sentences = [s for s in calibration_text().split(".") if len(s) > 20]
    assert cal_sentences and not any(s in held for s in cal_sentences)
    for name in tasks.TASKS:  # the steering profiler's examples are generated, not cut from the novel
        assert not any(ex.prompt[:80] in held for ex in tasks.make_task(name, n=4).examples)
    # passes and profilers cannot import graphwright.eval (tests/test_layering.py); the one pass that opens the novel,
    # Q-Filters' calibration (passes/qfilter_calibrate.py, named in evict.py's report line), reads only its first
    # 8 x QFILTER_TOKENS characters, inside the calibration part (the long-perplexity windows never see them)
    from graphwright.passes import qfilter_calibrate

    pkg = pathlib.Path(data.__file__).parents[1]
    readers = sorted(p.name for d in ("passes", "steer", "ops", "runtime") for p in (pkg / d).rglob("*.py")
                     if data.DEFAULT_TEXT in p.read_text() or "default_text_path" in p.read_text())
    assert readers == ["evict.py", "qfilter_calibrate.py"]
    assert "[: 8 * n_tokens]" in pathlib.Path(qfilter_calibrate.__file__).read_text()
    assert 8 * qfilter_calibrate.QFILTER_TOKENS < len(cal)


def test_heldout_windows_and_long_perplexity(tiny, compiled_tiny):
    bt = ByteTokenizer()
    wins = heldout_windows(bt, n_windows=2, window=64)
    held = data.heldout_part().encode("utf-8")
    assert [w.shape for w in wins] == [(1, 64), (1, 64)] and bytes(wins[0][0].tolist()) == held[:64]
    with pytest.raises(ValueError, match="room for"):
        heldout_windows(bt, n_windows=10_000, window=4096)
    cm = compiled_tiny("tiny-llama")
    a = long_perplexity(cm, wins, prefix=32, progress=False)
    b = long_perplexity(tiny("tiny-llama"), wins, prefix=32, progress=False)  # Hugging Face's own cache
    assert a["tokens"] == 2 * 31 and np.allclose(a["nll"], b["nll"], atol=1e-4)
    dense = cm.info.dense_kv_bytes_per_token() * 63
    assert a["kv_bytes"] == [dense, dense] and b["kv_bytes"] == [None, None]
    with pytest.raises(ValueError, match="prefix must be"):
        long_perplexity(cm, wins, prefix=63)


def test_default_ppl_mode_reads_pass_facts():
    from types import SimpleNamespace as Compiled  # default_ppl_mode reads only cm.recipe's pass classes

    from graphwright.eval.modes import default_ppl_mode

    assert default_ppl_mode(Compiled(recipe=None))[0] == default_ppl_mode(Compiled(recipe="noop"))[0] == "window"
    mode, why = default_ppl_mode(Compiled(recipe="h2o(heavy=0.25, recent=0.25)"))
    assert mode == "stream" and "h2o produces evicted" in why
    assert default_ppl_mode(Compiled(recipe="lowrank_kv(keep=0.5) + noop"))[0] == "stream"


def test_cli_ppl_default_mode_shows_eviction(tmp_path):
    from graphwright.cli.main import main

    out = tmp_path / "ppl"
    assert main(["eval", "--model", "tiny-llama", "--recipe", "h2o(heavy=0.25, recent=0.25)", "--tokens", "120",
                 "--window", "64", "--stride", "32", "--out", str(out)]) == 0
    row = json.loads((out / "eval.json").read_text())["rows"][0]
    assert row["mode"] == "stream" and row["delta"] != 0.0
    assert 0.3 < row["kv_fraction"] < 0.7  # heavy 25% + recent 25% of the window really held


def test_cli_suite_writes_table_and_plot(tmp_path):
    from graphwright.cli.main import main

    out = tmp_path / "suite"
    assert main(["eval", "--suite", "long", "--model", "tiny-llama", "--recipe", "streaming(sinks=4, window=32)",
                 "--lengths", "360", "--cases", "2", "--ruler-tasks", "niah_multikey_1", "--ruler-lengths", "600",
                 "--ppl-windows", "2", "--ppl-window", "64", "--ppl-prefix", "32", "--out", str(out)]) == 0
    res = json.loads((out / "suite.json").read_text())
    assert (out / "suite.md").read_text().startswith("| task |") and (out / "suite.png").stat().st_size > 1000
    assert res["settings"]["cases"] == {"niah": 2, "ruler": 2, "ppl": 2}
    dense = [r for r in res["rows"] if r["recipe"] == "dense"]
    assert dense and all((r["delta"], r["delta_lo"], r["delta_hi"]) == (0.0, 0.0, 0.0) and r["kv_fraction"] == 1.0 for r in dense)
    ppl = next(r for r in res["rows"] if r["task"] == "ppl" and r["recipe"] != "dense")
    assert ppl["kv_fraction"] < 0.6 and ppl["delta"] != 0.0
    assert res["ruler_excluded_tasks"] == ["niah_multikey_1"]  # a random tiny model finds no 7-digit number


def test_suite_scores_perplexity_in_blocks_where_exact_and_decode_steps_elsewhere(tiny, tmp_path):
    """run_suite's ppl_block: dense and duo score their windows in continuation steps (the row says block), h2o by
    decode steps (no block); the NLLs equal an all-decode-step run within 1e-5, under the same journal keys."""
    from graphwright.eval import suite
    from graphwright.eval.journal import Journal

    small = dict(tasks=("ppl",), lengths=(), cases=1, ruler_tasks=(), ruler_lengths=(), ppl_windows=2, ppl_window=64,
                 ppl_prefix=32, progress=False, model_name="tiny-llama")
    recipes = ["duo(retrieval=[[0, 0]], sinks=2, window=4)", "h2o(heavy=4, recent=4)"]
    model = tiny("tiny-llama")
    jb, js = Journal(tmp_path / "blocks.jsonl"), Journal(tmp_path / "steps.jsonl")
    blocks = suite.run_suite(model, ByteTokenizer(), recipes, ppl_block=8, journal=jb, **small)
    steps = suite.run_suite(model, ByteTokenizer(), recipes, ppl_block=None, journal=js, **small)
    assert blocks["settings"]["ppl_block"] == 8 and steps["settings"]["ppl_block"] is None
    for label in ["dense", *recipes]:
        a, b = blocks["raw"][label]["ppl"], steps["raw"][label]["ppl"]
        assert len(a["nll"]) == 2 and max(abs(x - y) for x, y in zip(a["nll"], b["nll"])) <= 1e-5, label
        assert a["kv_bytes"] == b["kv_bytes"]
    used = {k["recipe"]: row.get("block") for k, row in jb.records()}
    assert used == {"dense": 8, recipes[0]: 8, recipes[1]: None}
    assert {k["recipe"]: row.get("block") for k, row in js.records()} == {"dense": None, recipes[0]: None, recipes[1]: None}
    assert sorted(json.dumps(k, sort_keys=True) for k, _ in jb.records()) == sorted(json.dumps(k, sort_keys=True) for k, _ in js.records())
