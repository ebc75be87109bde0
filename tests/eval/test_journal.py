"""Resumable suite (``graphwright.eval.journal``): interrupted + resumed == one uninterrupted run; keys keep recipes apart."""

import json
import sys

import pytest

from graphwright.eval import suite
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.eval.journal import Journal, case_hash, make_key

SMALL = dict(tasks=("niah", "ruler", "ppl"), lengths=(360,), cases=2, ruler_tasks=("niah_multikey_1",), ruler_lengths=(600,),
             ppl_windows=2, ppl_window=64, ppl_prefix=32, progress=False, model_name="tiny-llama")
RECIPE = "streaming(sinks=4, window=32)"
REAL_RUN_CASE = suite._run_case


def _key(case="c0", recipe="dense"):
    return make_key("m", recipe, "aware", "niah", 100, case, 0, case_hash([1, 2, 3], "x"), {"max_new_tokens": 4})


def test_journal_appends_reloads_and_refuses_bad_lines(tmp_path):
    path = tmp_path / "j.jsonl"
    jr = Journal(path)
    jr.add(_key("c0"), {"correct": True, "v": 0.1})
    jr.add(_key("c1"), {"correct": False, "v": 1 / 3})
    with pytest.raises(ValueError, match="already holds a row"):
        jr.add(_key("c0"), {"correct": False})
    again = Journal(path)
    assert len(again) == 2 and again.get(_key("c1")) == {"correct": False, "v": 1 / 3} and again.get(_key("c2")) is None
    assert again.get(_key("c0", recipe="snapkv(budget=8)")) is None  # the recipe is part of the key
    # a run killed mid-write leaves a torn last line: cut off with a warning, that case runs again
    path.write_text(path.read_text() + '{"key": {"model": "m", "reci')
    with pytest.warns(UserWarning, match="torn last line"):
        torn = Journal(path)
    assert len(torn) == 2 and path.read_text().endswith("}\n")
    torn.add(_key("c2"), {"correct": True})
    assert len(Journal(path)) == 3
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="line 2 is not a journal record"):
        Journal(path)
    with pytest.raises(ValueError, match="missing"):
        Journal().get({"model": "m"})


def test_keys_hold_the_head_set_files_a_recipe_reads(tmp_path, monkeypatch):
    """duo(retrieval=0.375) means "the top of whatever head set ships": a re-fitted shipped file is a different key."""
    from graphwright.eval import journal

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "m_duo.json").write_text("{1}")
    (shipped / "m_retrieval.json").write_text("{2}")
    monkeypatch.setattr("graphwright.heads.headset.SHIPPED", shipped)
    mine = tmp_path / "mine.json"
    mine.write_text("{3}")

    def read(recipe):
        return journal.headsets_read("m", recipe)

    duo_hash = {"m_duo.json": journal._file_hash(shipped / "m_duo.json")}
    assert read("duo(retrieval=0.375, sinks=4, window=8)") == read("duo(sinks=4, window=8)") == duo_hash
    assert set(read('duo(sinks=4, window=8) + snapkv(budget=9, heads="scores")')) == {"m_duo.json", "m_retrieval.json"}
    assert set(read(f'snapkv(budget=9, heads="scores", headset="{mine}")')) == {"mine.json"}
    assert read("duo(retrieval=[[0, 1]], sinks=4, window=8)") == read('duo(retrieval="auto")') == read("snapkv(budget=9)") == {}
    assert read("dense") == read("not a recipe (") == {}
    assert journal.headsets_read("other-model", "duo(sinks=4, window=8)") == {}
    before = make_key("m", "duo(retrieval=0.375)", "aware", "niah", 100, "c0", 0, "h", {"backend": "torch"})
    assert before["settings"] == {"backend": "torch", "headsets": {"m_duo.json": journal._file_hash(shipped / "m_duo.json")}}
    (shipped / "m_duo.json").write_text("{1, refitted}")
    after = make_key("m", "duo(retrieval=0.375)", "aware", "niah", 100, "c0", 0, "h", {"backend": "torch"})
    assert after != before and after["settings"]["headsets"] != before["settings"]["headsets"]
    j = Journal(tmp_path / "j.jsonl")
    j.add(before, {"score": 1.0})
    assert Journal(tmp_path / "j.jsonl").get(before) == {"score": 1.0} and Journal(tmp_path / "j.jsonl").get(after) is None
    # a table rebuilt from the journal does not show the old rows, and says why
    kf = {f: before[f] for f in ("mode", "task", "length", "case", "case_hash")} | {"settings": {"backend": "torch"}}
    with pytest.warns(UserWarning, match=r"rows of 'duo\(retrieval=0.375\)' made with other head-set files"):
        res = suite.run_label(None, None, "duo(retrieval=0.375)", [("niah", None, kf)], Journal(tmp_path / "j.jsonl"), "m", 0,
                              32, 4, run_missing=False, progress=False)
    assert res == {}


def test_case_hash_tells_cases_apart():
    assert case_hash([1, 2, 3]) == case_hash([1, 2, 3]) != case_hash([1, 2, 4])
    assert case_hash([1, 2, 3], "ducks") != case_hash([1, 2, 3], "cake")


class SessionEnded(RuntimeError):
    """Stands for the process being killed at a session's end."""


def _counting(monkeypatch, fail_after=None):
    calls = []
    real = REAL_RUN_CASE  # not suite._run_case: an earlier patch in the same test may be in place

    def run_case(cm, tok, task, case, *a):
        if fail_after is not None and len(calls) == fail_after:
            raise SessionEnded("session ended")
        calls.append(task)
        return real(cm, tok, task, case, *a)

    monkeypatch.setattr(suite, "_run_case", run_case)
    return calls


def test_interrupted_then_resumed_equals_one_run(tiny, tmp_path, monkeypatch):
    model, tok = tiny("tiny-llama"), ByteTokenizer()
    calls = _counting(monkeypatch)
    whole = suite.run_suite(model, tok, [RECIPE], journal=tmp_path / "whole.jsonl", **SMALL)
    total = len(calls)
    assert total == 2 * (2 + 2 + 2)  # dense + recipe, each 2 needles + 2 RULER + 2 windows
    k = 5
    calls = _counting(monkeypatch, fail_after=k)
    path = tmp_path / "part.jsonl"
    with pytest.raises(SessionEnded):
        suite.run_suite(model, tok, [RECIPE], journal=path, **SMALL)
    assert len(path.read_text().splitlines()) == k  # every finished case was written at once
    calls = _counting(monkeypatch)
    resumed = suite.run_suite(model, tok, [RECIPE], journal=path, out=tmp_path / "out", **SMALL)
    assert len(calls) == total - k  # only the missing cases ran
    assert resumed["rows"] == whole["rows"] and resumed["raw"] == whole["raw"]
    assert json.loads((tmp_path / "out" / "suite.json").read_text())["rows"] == whole["rows"]
    # nothing left to do: a rerun runs no case and compiles nothing
    calls = _counting(monkeypatch)
    monkeypatch.setattr(sys.modules["graphwright.compile"], "compile", lambda *a, **k: pytest.fail("compiled with every case done"))
    assert suite.run_suite(model, tok, [RECIPE], journal=path, **SMALL)["rows"] == whole["rows"] and calls == []


def test_changed_recipe_does_not_reuse_rows_and_partial_cells_say_n(tiny, tmp_path, monkeypatch):
    model, tok = tiny("tiny-llama"), ByteTokenizer()
    path = tmp_path / "j.jsonl"
    calls = _counting(monkeypatch)
    first = suite.run_suite(model, tok, [RECIPE], journal=path, **SMALL)
    calls = _counting(monkeypatch)
    other = "streaming(sinks=4, window=16)"
    second = suite.run_suite(model, tok, [other], journal=path, **SMALL)
    assert len(calls) == 6  # the new recipe's cases all ran; dense's came from the journal
    assert set(second["raw"]) == {"dense", other} and second["raw"]["dense"] == first["raw"]["dense"]
    keys = [k for k, _ in Journal(path).records()]
    assert sum(k["recipe"] == other for k in keys) == 6 and sum(k["recipe"] == RECIPE for k in keys) == 6
    # a journal with only some cases: the table is built from what is done, n per cell
    part = tmp_path / "part.jsonl"
    recs = Journal(path).records()
    keep = [(k, r) for k, r in recs if k["recipe"] == "dense" or (k["recipe"] == RECIPE and k["case"].endswith("c0"))]
    jr = Journal(part)
    for k, r in keep:
        jr.add(k, r)
    res = suite.run_suite(model, tok, [RECIPE], journal=part, run_missing=False, **SMALL)
    rec = {(r["task"], r["metric"]): r for r in res["rows"] if r["recipe"] == RECIPE}
    assert rec[("niah", "all")]["n"] == 1 and rec[("ruler", "all")]["n"] == 1 and ("ppl", "window=64,prefix=32") not in rec
    dense = {(r["task"], r["metric"]): r for r in res["rows"] if r["recipe"] == "dense"}
    assert dense[("niah", "all")]["n"] == 2 and dense[("ppl", "window=64,prefix=32")]["n"] == 2
