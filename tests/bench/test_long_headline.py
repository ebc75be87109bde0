"""bench/long_headline.py: templates fill per length; --table-only lists every recipe the journal holds at a length."""


from graphwright.eval.journal import Journal, make_key
from tests.bench.bench_scripts import load_bench


def _mod():
    return load_bench("long_headline")


def test_journal_recipes_per_length_and_model_in_first_seen_order(tmp_path):
    lh = _mod()
    jr = Journal(tmp_path / "cases.jsonl")
    rows = [("m", "dense", 1024, "c0"), ("m", "duo(retrieval=0.2, sinks=4, window=32)", 1024, "c0"),
            ("m", "evict(budget=256, score=\"criticalkv\")", 1024, "c0"), ("m", "duo(retrieval=0.2, sinks=4, window=32)", 1024, "c1"),
            ("m", "snapkv(budget=512)", 2048, "c0"), ("other", "snapkv(budget=128)", 1024, "c0")]
    for model, recipe, length, case in rows:
        jr.add(make_key(model, recipe, "aware", "niah", length, case, 0, "h"), {"correct": True})
    jr = Journal(tmp_path / "cases.jsonl")  # as reloaded from the file
    assert lh.journal_recipes(jr, 1024, "m") == ["duo(retrieval=0.2, sinks=4, window=32)", "evict(budget=256, score=\"criticalkv\")"]
    assert lh.journal_recipes(jr, 2048, "m") == ["snapkv(budget=512)"]
    assert lh.journal_recipes(jr, 4096, "m") == []


def test_templates_fill_for_the_length_and_table_only_defaults_to_the_journal():
    lh = _mod()
    assert lh.recipes_for(2048, ["snapkv(budget={quarter})", "streaming(sinks=4, window={half_w})"]) == [
        "snapkv(budget=512)", "streaming(sinks=4, window=1020)"]
    assert lh.parse_args(["--table-only"]).recipes is None
    assert lh.parse_args(["--recipes", "snapkv(budget={half})"]).recipes == ["snapkv(budget={half})"]


def test_strided_order_visits_every_case_once_and_spreads_each_pass_over_the_depths():
    lh = _mod()
    assert lh.strided(12, 5) == [0, 5, 10, 1, 6, 11, 2, 7, 3, 8, 4, 9]
    order = lh.strided(50, 5)
    assert sorted(order) == list(range(50))
    assert order[:10] == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]  # the first pass: depths 0 to 45/49 in steps of 5/49
    assert lh.strided(7, 1) == list(range(7)) and lh.parse_args([]).stride == 1


def test_paired_difference_uses_only_the_cases_both_recipes_hold(tmp_path):
    lh = _mod()
    jr = Journal(tmp_path / "cases.jsonl")
    a, b = 'snapkv(budget=8, gamma=0.5, heads="scores")', "snapkv(budget=8)"
    for case, ca, cb in [("c0", 1, 0), ("c1", 1, 1), ("c2", 0, 0), ("c3", 1, None)]:
        jr.add(make_key("m", a, "aware", "niah", 64, case, 0, "h"), {"correct": bool(ca)})
        if cb is not None:
            jr.add(make_key("m", b, "aware", "niah", 64, case, 0, "h"), {"correct": bool(cb)})
    jr.add(make_key("m", b, "aware", "niah", 128, "c0", 0, "h"), {"correct": True})  # another length: not paired
    pr = lh.paired(jr, 64, "m", a, b)
    assert pr["n"] == 3 and abs(pr["acc_a"] - 2 / 3) < 1e-12 and abs(pr["acc_b"] - 1 / 3) < 1e-12
    assert abs(pr["delta"] - 1 / 3) < 1e-12 and pr["lo"] <= pr["delta"] <= pr["hi"]
    assert lh.paired(jr, 128, "m", a, b)["n"] == 0
