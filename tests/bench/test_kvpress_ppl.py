"""bench/kvpress_ppl.py and its worker: kvpress's side scores the very tokens graphwright's long perplexity scores, only
windows with the same ids and prefix are paired, and kvpress's best press per budget gets an honest verdict."""

import json
import math

import pytest
import torch

from graphwright.eval.journal import Journal, make_key
from graphwright.eval.perplexity import long_perplexity
from tests.bench.bench_scripts import load_bench

PREFIX = 6


def test_worker_scores_the_tokens_long_perplexity_scores(tiny):
    """Dense (no press): a compressed-prefill-then-one-pass score equals graphwright's decode-step reference on HF."""
    worker = load_bench("kvpress_ppl_worker")
    model = tiny("tiny-llama")
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    row = worker.window_nll(model, None, ids[0].tolist(), PREFIX)
    want = long_perplexity(model, [ids], prefix=PREFIX, progress=False)["nll"][0]
    assert abs(row["nll"] - want) < 1e-5
    assert row["tokens_held"] == 23 and row["kept_prefix_tokens"] == PREFIX  # every fed token, nothing compressed
    assert row["cache_bytes"] > 0
    with pytest.raises(ValueError, match="prefix must be in"):
        worker.window_nll(model, None, ids[0].tolist(), 23)


WINDOWS = [{"id": f"w{i}", "ids": [5 + i] * 12, "key": {"mode": "stream", "task": "ppl", "length": 12, "case": f"w{i}",
            "case_hash": f"h{i}", "settings": {"prefix": PREFIX, "backend": "torch"}}} for i in range(4)]


def _args(kp, tmp_path, pairs=()):
    argv = ["--journal", str(tmp_path / "j.jsonl"), "--out", str(tmp_path), "--budgets", "0.5", "0.25", "--prefix", str(PREFIX),
            "--window", "12", "--windows", "4"]
    for b, recipe in pairs:
        argv += ["--pair", b, recipe]
    return kp.parse_args(argv)


def _ours(tmp_path, rows):
    jr = Journal(tmp_path / "j.jsonl")
    for recipe, w, h, nll, kv in rows:
        key = make_key("smollm2-135m", recipe, "stream", "ppl", 12, w, 0, h, {"prefix": PREFIX, "backend": "torch"})
        jr.add(key, {"nll": nll, "kv_bytes": kv, "kv_bytes_dense": 100})


def _theirs(tmp_path, rows, prefix=PREFIX):
    ids_hash = load_bench("kvpress_worker").ids_hash
    with open(tmp_path / "kvpress_ppl.jsonl", "w") as f:
        for method, budget, i, nll, nbytes in rows:
            key = {"model": "smollm2-135m", "method": method, "budget": budget, "window": f"w{i}", "prefix": prefix,
                   "case_hash": ids_hash(WINDOWS[i]["ids"], prefix), "version": "v"}
            f.write(json.dumps({"key": key, "row": {"method": method, "budget": budget, "window": f"w{i}", "nll": nll,
                                                    "cache_bytes": nbytes}}) + "\n")


def test_table_pairs_the_same_windows_and_picks_kvpress_best_press(tmp_path, capsys):
    kp = load_bench("kvpress_ppl")
    kr = load_bench("kvpress_ruler")
    base = [3.0, 3.1, 3.2, 3.3]
    ours = [("dense", f"w{i}", f"h{i}", base[i], 100) for i in range(4)]
    ours += [("snapkv(budget=3)", f"w{i}", f"h{i}", base[i] + 0.01, 60) for i in range(4)]
    ours += [("dense", "w9", "h9", 9.0, 100)]  # another window set: never read
    _ours(tmp_path, ours)
    theirs = [("dense", None, i, base[i] + 1e-7, 200) for i in range(4)]
    theirs += [("SnapKV", 0.25, i, base[i] + 0.05, 110) for i in range(4)]
    theirs += [("ChunkKV(SnapKV)", 0.25, i, base[i] + 0.03 + 0.001 * i, 110) for i in range(4)]
    theirs += [("StreamingLLM", 0.5, i, base[i] + 0.002, 130) for i in range(3)]  # one window short
    _theirs(tmp_path, theirs)
    # a pair is read under the journal's spelling of its recipe; one with no rows is named on stderr, not dropped silently
    args = _args(kp, tmp_path, pairs=[("0.25", "snapkv( budget = 3 )"), ("0.5", "snapkv(budget=3)"), ("0.5", "snapkv(budget=4)")])
    got = kr.our_rows(tmp_path / "j.jsonl", WINDOWS, "smollm2-135m")
    assert sorted(got) == ["dense", "snapkv(budget=3)"] and sorted(got["dense"]) == ["w0", "w1", "w2", "w3"]
    res = kp.summarise(got, kp.kvpress_rows(tmp_path, WINDOWS, args), WINDOWS, args)
    by = {(r["side"], r["method"]): r for r in res["rows"]}
    snap = by[("graphwright", "snapkv(budget=3)")]
    assert snap["n"] == 4 and snap["kv_fraction"] == pytest.approx(0.6)
    assert snap["vs_own_dense"]["ratio_minus_1"] == pytest.approx(math.expm1(0.01))
    chunk = by[("kvpress", "ChunkKV(SnapKV)@0.25")]
    assert chunk["kv_fraction"] == pytest.approx(110 / 200)
    assert chunk["vs_own_dense"]["ratio_minus_1"] == pytest.approx(math.expm1(0.0315 - 1e-7), rel=1e-4)
    assert res["dense_agreement"] == {"n": 4, "max_abs_nll_difference": pytest.approx(1e-7)}
    assert "--pair 0.5 snapkv(budget=4): no graphwright rows for it in the journal" in capsys.readouterr().err
    v25, v50 = res["best_vs_best"]
    assert v25["kvpress_best"] == "ChunkKV(SnapKV)@0.25" and v25["n"] == 4  # lower perplexity than SnapKV's
    assert v25["ours_over_kvpress"]["hi"] < 0 and v25["verdict"] == "ahead"  # ours is lower on every window
    assert v50["kvpress_best"] == "StreamingLLM@0.5" and v50["n"] == 3 and v50["verdict"] == "behind"
    md = kp.to_markdown(res)
    assert "**ahead**" in md and "**behind**" in md and "`ChunkKV(SnapKV)@0.25`" in md


def test_rows_of_another_prefix_or_window_are_not_read(tmp_path):
    kp = load_bench("kvpress_ppl")
    _theirs(tmp_path, [("dense", None, 0, 3.0, 200)], prefix=PREFIX + 1)
    args = _args(kp, tmp_path)
    assert kp.kvpress_rows(tmp_path, WINDOWS, args) == {}
    other = [dict(w, ids=[1] * 12) for w in WINDOWS]  # same ids' names, other tokens
    _theirs(tmp_path, [("dense", None, 0, 3.0, 200)])
    assert kp.kvpress_rows(tmp_path, other, args) == {}
    assert list(kp.kvpress_rows(tmp_path, WINDOWS, args)) == ["dense"]


def test_bad_arguments_say_what_is_allowed(tmp_path):
    kp = load_bench("kvpress_ppl")
    with pytest.raises(SystemExit):
        kp.parse_args(["--out", str(tmp_path), "--budgets", "1.5"])
    with pytest.raises(SystemExit):
        kp.parse_args(["--out", str(tmp_path), "--budgets", "0.5", "--pair", "0.25", "dense"])
    with pytest.raises(SystemExit):
        kp.parse_args(["--out", str(tmp_path), "--prefix", "4095"])
