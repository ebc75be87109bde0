"""bench/kvpress_ruler.py: only rows of the very same prompts are paired; both sides are scored with string_match_all;
kvpress's best press per budget is compared with each graphwright recipe, with an honest verdict."""

import json

import pytest

from graphwright.eval.journal import Journal, make_key
from tests.bench.bench_scripts import load_bench


class Tok:
    """Token id i decodes to the i-th word of a fixed list; id 0 is the special end token (dropped)."""
    words = ["</s>", "111", "222", "333", "444", "x"]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.words[i] for i in ids if not (skip_special_tokens and i == 0))


CASES = [{"id": f"mv-c{i}", "task": "niah_multivalue", "ids": [7] * 10, "references": ["111", "222"], "max_new_tokens": 8,
          "case_hash": f"h{i}", "key": {"mode": "aware", "task": "ruler", "length": 1024, "case": f"mv-c{i}", "case_hash": f"h{i}",
                                        "settings": {"backend": "torch"}}} for i in range(4)]


def _args(kr, tmp_path, pairs=()):
    argv = ["--journal", str(tmp_path / "j.jsonl"), "--out", str(tmp_path), "--budgets", "0.5", "0.3"]
    for b, recipe in pairs:
        argv += ["--pair", b, recipe]
    return kr.parse_args(argv)


def _journal(tmp_path, rows):
    jr = Journal(tmp_path / "j.jsonl")
    for recipe, case, h, score, kv, *seed in rows:
        key = make_key("smollm2-135m", recipe, "aware", "ruler", 1024, case, seed[0] if seed else 0, h, {"backend": "torch"})
        jr.add(key, {"id": case, "score": score, "kv_bytes": kv, "answer": str(score)})


def _kv_answers(tmp_path, rows):
    with open(tmp_path / "kvpress_answers.jsonl", "w") as f:
        for method, budget, case, new_ids, nbytes, kept, compressed in rows:
            prompt = [7] * compressed  # the CASES prompt when compressed == 10
            key = {"case": case, "max_new_tokens": 8, "method": method, "budget": budget,
                   "case_hash": load_bench("kvpress_worker").ids_hash(prompt, len(prompt))}
            row = {"method": method, "budget": budget, "id": case, "new_ids": new_ids, "cache_bytes": nbytes,
                   "kept_tokens": kept, "compressed_tokens": compressed}
            f.write(json.dumps({"key": key, "row": row}) + "\n")


def test_our_rows_keep_only_the_same_prompts(tmp_path):
    kr = load_bench("kvpress_ruler")
    _journal(tmp_path, [("dense", "mv-c0", "h0", 1.0, 100), ("dense", "mv-c1", "OTHER", 1.0, 100),  # another prompt
                        ("duo", "mv-c0", "h0", 0.5, 40), ("dense", "mv-c9", "h9", 1.0, 100),        # another case set
                        ("duo", "mv-c2", "h2", 1.0, 40, 7)])                                          # another seed
    got = kr.our_rows(tmp_path / "j.jsonl", CASES, "smollm2-135m")
    assert sorted(got) == ["dense", "duo"] and list(got["dense"]) == ["mv-c0"] and got["duo"]["mv-c0"]["score"] == 0.5
    assert list(got["duo"]) == ["mv-c0"]  # the seed-7 row is another run's
    with pytest.raises(SystemExit, match="no dense row"):
        kr.our_rows(tmp_path / "j.jsonl", CASES, "another-model")
    # a fraction of the shipped head set: only the rows answered with the file that ships today
    recipe = "duo(retrieval=0.375, sinks=4, window=128)"
    _journal(tmp_path, [(recipe, "mv-c0", "h0", 1.0, 40), (recipe, "mv-c1", "h1", 0.0, 40)])
    jr = Journal(tmp_path / "j.jsonl")
    old = make_key("smollm2-135m", recipe, "aware", "ruler", 1024, "mv-c3", 0, "h3", {"backend": "torch"})
    assert old["settings"]["headsets"]  # the shipped duo file is read
    old["settings"]["headsets"] = {name: "0" * 12 for name in old["settings"]["headsets"]}  # an earlier file
    jr.add(old, {"id": "mv-c3", "score": 1.0, "kv_bytes": 40, "answer": "1.0"})
    got = kr.our_rows(tmp_path / "j.jsonl", CASES, "smollm2-135m")
    assert sorted(got[recipe]) == ["mv-c0", "mv-c1"]
    with pytest.raises(SystemExit, match="no such journal"):
        kr.our_rows(tmp_path / "missing.jsonl", CASES, "smollm2-135m")


def test_kvpress_rows_are_scored_with_string_match_all_and_other_prompts_dropped(tmp_path):
    kr = load_bench("kvpress_ruler")
    _kv_answers(tmp_path, [("dense", None, "mv-c0", [1, 2, 0], 1000, 10, 10),        # both values: 1.0
                           ("SnapKV", 0.5, "mv-c0", [1, 5, 0], 500, 5, 10),          # one of two: 0.5
                           ("SnapKV", 0.5, "mv-c1", [1, 2], 500, 5, 11),             # other token ids: not this prompt
                           ("DuoAttention(graphwright heads)", None, "mv-c0", [5], 1000, 10, 10)])
    got = kr.kvpress_rows(tmp_path, CASES, Tok())
    assert got["dense"]["mv-c0"]["score"] == 1.0 and got["dense"]["mv-c0"]["answer"] == "111 222"
    assert got["SnapKV@0.5"]["mv-c0"]["score"] == 0.5 and "mv-c1" not in got["SnapKV@0.5"]
    assert got["DuoAttention(graphwright heads)"]["mv-c0"]["score"] == 0.0


def test_summary_pairs_best_press_per_budget_with_each_recipe(tmp_path):
    kr = load_bench("kvpress_ruler")
    ids = [c["id"] for c in CASES]
    ours = {"dense": {i: {"score": 1.0, "kv_bytes": 100, "answer": "a"} for i in ids},
            "duo": {i: {"score": 1.0, "kv_bytes": 40, "answer": "a"} for i in ids}}
    one = {"kept_tokens": 5, "compressed_tokens": 10, "cache_bytes": 50, "answer": "b"}
    theirs = {"dense": {i: {"score": 1.0, "kept_tokens": 10, "compressed_tokens": 10, "cache_bytes": 100, "answer": "a"} for i in ids},
              "SnapKV@0.5": {i: {**one, "score": 0.0} for i in ids},
              "ChunkKV(SnapKV)@0.5": {i: {**one, "score": float(i == "mv-c0")} for i in ids},
              "SnapKV@0.3": {i: {**one, "score": 1.0} for i in ids},
              "TOVA@0.3": {ids[0]: {**one, "score": 1.0}}}  # stopped after one case: listed, not picked
    res = kr.summarise(ours, theirs, CASES, _args(kr, tmp_path, pairs=[("0.5", "duo"), ("0.3", "duo")]))
    v = {r["budget"]: r for r in res["best_vs_best"]}
    assert v[0.5]["kvpress_best"] == "ChunkKV(SnapKV)@0.5" and v[0.5]["difference"]["mean"] == 0.75 and v[0.5]["verdict"] == "ahead"
    assert v[0.3]["kvpress_best"] == "SnapKV@0.3" and v[0.3]["difference"]["mean"] == 0.0 and v[0.3]["verdict"] == "level"
    assert v[0.3]["n"] == 4 and v[0.3]["fewer_cases"] == {"TOVA@0.3": 1} and v[0.5]["fewer_cases"] == {}
    rows = {(r["side"], r["method"]): r for r in res["rows"]}
    assert rows[("graphwright", "duo")]["kv_fraction"] == 0.4 and rows[("kvpress", "SnapKV@0.5")]["kv_fraction"] == 0.5
    assert rows[("kvpress", "SnapKV@0.5")]["prompt_kept"] == 0.5 and rows[("kvpress", "SnapKV@0.5")]["vs_dense"]["mean"] == -1.0
    assert res["dense_agreement"] == {"n": 4, "same_answer": 4, "same_score": 4}
    md = kr.to_markdown(res)
    assert "| 0.5 | `ChunkKV(SnapKV)@0.5` | 0.25 " in md and "**ahead**" in md and "**level**" in md
    assert "the same answer text on 4 of 4 cases" in md and "not picked, run on fewer cases: `TOVA@0.3` (1)." in md


def test_bad_budget_or_pair_is_refused(tmp_path, capsys):
    kr = load_bench("kvpress_ruler")
    with pytest.raises(SystemExit):
        kr.parse_args(["--journal", "j", "--out", str(tmp_path), "--budgets", "1.5"])
    assert "in (0, 1); got [1.5]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args(kr, tmp_path, pairs=[("0.25", "duo")])
    assert "--pair BUDGET must be one of --budgets [0.5, 0.3]; got '0.25'" in capsys.readouterr().err
