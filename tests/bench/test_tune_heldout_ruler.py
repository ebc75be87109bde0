"""bench/tune_heldout_ruler.py: each table column is paired on its own cases; a recipe without a column's task shows '-'."""

from tests.bench.bench_scripts import load_bench


def _rows(task, scores, kv=100):
    return [{"id": f"{task}-c{i}", "task": task, "score": s, "kv_bytes": kv} for i, s in enumerate(scores)]


def test_columns_pair_on_their_own_cases_and_skip_recipes_without_the_task():
    th = load_bench("tune_heldout_ruler")
    raw = {"dense": {"ruler": _rows("a", [1, 1, 0, 1]) + _rows("b", [1, 0, 1, 1]) + _rows("vt", [0, 0, 0])},
           "r1": {"ruler": _rows("a", [1, 0, 0], kv=25) + _rows("b", [0, 0, 1, 1], kv=25)},  # 3 of a's 4 cases
           "r2": {"ruler": _rows("a", [0, 0, 0, 0], kv=50)}}  # task a only
    lines, rows, n = th.paired_table({"raw": raw, "ruler_headline_tasks": ["a", "b"]}, vs="r1")
    got = {r["recipe"]: r for r in rows}
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| `dense`", "| **tuned: `r1`**", "| `r2`"]
    # column a: r1 holds c0-c2 only, so every recipe is paired on those 3
    assert got["dense"]["groups"]["a"]["n"] == 3 and got["r2"]["groups"]["a"]["n"] == 3
    assert abs(got["dense"]["groups"]["a"]["score"]["mean"] - 2 / 3) < 1e-9
    assert abs(got["r1"]["groups"]["a"]["vs_dense"]["mean"] - (-1 / 3)) < 1e-9
    assert abs(got["r2"]["groups"]["a"]["vs_tuned"]["mean"] - (-1 / 3)) < 1e-9
    # column b: r2 never ran it, so it does not shrink b (4 cases) and shows '-'
    assert got["dense"]["groups"]["b"]["n"] == 4 and "b" not in got["r2"]["groups"]
    # vt: only dense ran it, its 3 cases stay whole; headline: r2 lacks b, so a + b pool dense and r1 (3 + 4 cases)
    assert got["dense"]["groups"]["vt"]["n"] == 3 and "vt" not in got["r1"]["groups"]
    assert got["r1"]["groups"]["headline"]["n"] == 7 and "headline" not in got["r2"]["groups"]
    assert lines[4].split(" | ")[3:] == ["-", "-", "- |"]  # r2: columns b, vt, headline
    assert abs(got["r1"]["kv_fraction"] - 0.25) < 1e-9 and abs(got["r2"]["kv_fraction"] - 0.5) < 1e-9
    assert n == 3 + 4 + 3


def test_vs_name_labels_the_reference_row_and_its_differences():
    th = load_bench("tune_heldout_ruler")
    raw = {"dense": {"ruler": _rows("a", [1, 0])}, "u": {"ruler": _rows("a", [0, 0])}, "s": {"ruler": _rows("a", [1, 0])}}
    lines, rows, _ = th.paired_table({"raw": raw, "ruler_headline_tasks": ["a"]}, vs="u", vs_name="uniform")
    assert lines[3].startswith("| **uniform: `u`** |") and "; vs uniform +0.50 " in lines[4]
    assert rows[2]["groups"]["a"]["vs_tuned"]["mean"] == 0.5 and th.parse_args([]).vs_name == "tuned"
