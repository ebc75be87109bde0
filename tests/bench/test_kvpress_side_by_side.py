"""bench/kvpress_side_by_side.py: our side on tiny-llama, the output schema, and the set-up message without kvpress's venv.

The kvpress side itself needs ``bench/.venv-kvpress`` (not in CI); its decode loop and byte count are tested
here on plain transformers objects: with no press, the worker's answer equals graphwright's dense answer.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.bench.bench_scripts import load_bench

BENCH = Path(__file__).parents[2] / "bench"


def _load(name):
    return load_bench(name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mod = _load("kvpress_side_by_side")
    out = tmp_path_factory.mktemp("kvp")
    missing = out / "no-venv" / "python"
    sys.path.insert(0, str(BENCH))
    try:
        assert mod.main(["--model", "tiny-llama", "--lengths", "384", "--cases", "2", "--budgets", "0.5",
                         "--recipes", "snapkv(budget={budget})", "streaming(sinks=4, window=100)",
                         "--kvpress-python", str(missing), "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCH))
    return mod, out, json.loads((out / "kvpress_side_by_side.json").read_text())


def test_our_side_schema_and_bytes(run):
    _, out, res = run
    assert {p.name for p in out.iterdir()} >= {"cases.json", "kvpress_side_by_side.json", "kvpress_side_by_side.md", "kvpress_side_by_side.png"}
    assert res["settings"]["cases_per_length"] == 2 and res["settings"]["graphwright_bytes"] in ("kv_bytes", "kv_storage_bytes")
    agnostic = {(r["side"], r["method"], r["budget"]): r for r in res["rows"] if r["mode"] == "agnostic"}
    rows = {(r["side"], r["method"], r["budget"]): r for r in res["rows"] if r["mode"] == "aware"}
    assert set(agnostic) == set(rows)  # both modes on our side: cm.prefill(context), then the question continues it
    assert all(agnostic[k]["cache_bytes"] < rows[k]["cache_bytes"] for k in rows if k[1] == "dense")  # the context alone
    fixed = ("graphwright", "streaming(sinks=4, window=100)", None)  # no {field}: one fixed setting, run once
    assert set(rows) == {("graphwright", "dense", None), ("graphwright", "snapkv(budget={budget})", 0.5), fixed}
    dense, snap = rows[("graphwright", "dense", None)], rows[("graphwright", "snapkv(budget={budget})", 0.5)]
    for r in (dense, snap):
        assert {"accuracy", "lo", "hi", "n", "delta", "delta_lo", "delta_hi", "cache_bytes", "bytes_fraction", "mode", "length"} <= set(r)
        assert r["n"] == 2 and r["lo"] <= r["accuracy"] <= r["hi"] and r["mode"] == "aware" and r["length"] == 384
    assert dense["delta"] == dense["delta_lo"] == dense["delta_hi"] == 0.0 and dense["bytes_fraction"] == 1.0
    # bytes are the storages held (kv_storage_bytes): snapkv(budget=192) on 384-token prompts holds exactly 192
    # tokens (2 layers x K,V x 2 KV heads x 16 dims x fp32 = 512 bytes each); dense holds its 384 plus the in-place
    # append's growth slack, which is reported, not hidden
    per_token = 2 * 2 * 2 * 16 * 4
    assert snap["cache_bytes"] == 192 * per_token and dense["cache_bytes"] >= 384 * per_token
    assert snap["bytes_fraction"] == snap["cache_bytes"] / dense["cache_bytes"]
    assert rows[fixed]["cache_bytes"] >= 104 * per_token and rows[fixed]["family"] == "streaming"
    raw = res["raw"]["graphwright"]
    cases = json.loads((out / "cases.json").read_text())
    assert [len(c["ids"]) for c in cases] == [384, 384] and all(0 < c["split"] < 384 for c in cases)
    # question-agnostic {budget} is a fraction of the context (kvpress's basis: its ratio applies to what it compresses),
    # int(0.5 x split) tokens, and the context's cache holds exactly that many; question-aware, of the whole prompt
    split = {c["id"]: c["split"] for c in cases}
    agn = [r for r in raw if r["mode"] == "agnostic" and r["method"] == "snapkv(budget={budget})"]
    assert len(agn) == 2 and all(r["recipe"] == f"snapkv(budget={split[r['id']] // 2})" for r in agn)
    assert all(r["cache_bytes"] == (split[r["id"]] // 2) * per_token for r in agn)
    assert len(raw) == 12 and {r["recipe"] for r in raw if r["mode"] == "aware"} == \
        {"noop", "snapkv(budget=192)", "streaming(sinks=4, window=100)"}


def test_missing_venv_says_how_to_set_it_up(run):
    _, out, res = run
    msg = res["settings"]["kvpress_skipped"]
    assert "bash bench/setup_kvpress.sh" in msg and "README-kvpress.md" in msg and "--skip-kvpress" in msg
    assert res["raw"]["kvpress"] == [] and "kvpress side skipped" in (out / "kvpress_side_by_side.md").read_text()


def test_agnostic_rows_of_the_other_basis_stay_out_of_the_table(run):
    mod, out, _ = run
    from graphwright.eval.journal import Journal

    jr, cases = Journal(out / "graphwright_answers.jsonl"), json.loads((out / "cases.json").read_text())
    for basis, n_snap in (("context", 2), ("prompt", 0)):  # the run wrote context-basis rows only
        args = mod.parse_args(["--model", "tiny-llama", "--agnostic-basis", basis])
        rows, _ = mod.journal_rows(jr, cases, args)
        agn = [r for r in rows if r["mode"] == "agnostic"]
        assert sum(r["method"] == "snapkv(budget={budget})" for r in agn) == n_snap
        assert sum(r["method"] == "dense" for r in agn) == 2  # no budget: the same rows on either basis
        assert sum(r["mode"] == "aware" for r in rows) == 6


def test_journal_rows_keep_head_set_recipes_answered_with_todays_files(tmp_path):
    """A recipe that reads a shipped head set is keyed with the files' hashes (``settings["headsets"]``): its rows are
    read when the hashes are today's, and left out when an earlier file answered them."""
    from types import SimpleNamespace

    from graphwright.eval.journal import Journal

    mod = _load("kvpress_side_by_side")
    case = {"id": "L2048-c0", "length": 2048, "ids": [5, 6, 7], "activity": "juggle", "split": 2}
    args = SimpleNamespace(model="smollm2-135m", seed=0, max_new_tokens=16, agnostic_basis="context")
    jr = Journal(tmp_path / "j.jsonl")
    shares = 'snapkv(budget=512, heads="scores", gamma=0.5)'
    for recipe in ("dense", shares):
        jr.add(mod.our_key(args.model, recipe, "aware", case, 0, 16), {"id": case["id"], "method": recipe, "mode": "aware"})
    stale = mod.our_key(args.model, "duo(retrieval=0.375, sinks=4, window=128)", "aware", case, 0, 16)
    assert stale["settings"]["headsets"]  # the shipped duo file
    stale["settings"]["headsets"] = {name: "000000000000" for name in stale["settings"]["headsets"]}
    jr.add(stale, {"id": case["id"], "method": "duo", "mode": "aware"})
    rows, _ = mod.journal_rows(jr, [case], args)
    assert [r["method"] for r in rows] == ["dense", shares]


def test_budget_tokens_is_kvpress_count():
    mod = _load("kvpress_side_by_side")
    # kvpress.utils.compute_n_kept(n, 1 - frac) = max(1, int(n * (1 - (1 - frac)))): floor, not round
    assert [mod.budget_tokens(0.5, n) for n in (1024, 996, 987, 981)] == [512, 498, 493, 490]
    assert [mod.budget_tokens(0.25, n) for n in (1024, 996, 987, 981)] == [256, 249, 246, 245]
    assert mod.budget_tokens(0.25, 2) == 1 and mod.fill("snapkv(budget={budget})", 0.5, 987) == "snapkv(budget=493)"


def test_bad_template_and_budget_are_named():
    mod = _load("kvpress_side_by_side")
    assert mod.fill("streaming(sinks=4, window={window})", 0.25, 1024) == "streaming(sinks=4, window=252)"
    assert mod.fill("h2o(heavy={half}, recent={half})", 0.5, 1024) == "h2o(heavy=0.25, recent=0.25)"
    with pytest.raises(SystemExit, match="unknown field 'tokens'.*allowed"):
        mod.fill("snapkv(budget={tokens})", 0.5, 1024)
    with pytest.raises(SystemExit):
        mod.parse_args(["--budgets", "1.5"])


def test_worker_without_press_matches_graphwright_dense(tiny, compiled_tiny):
    worker = _load("kvpress_worker")
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = compiled_tiny("tiny-llama").generate(torch.tensor([ids]), max_new_tokens=6)[0, 40:].tolist()
    for split in (40, 25):  # whole prompt in one forward (aware) / context, then the rest at its positions (agnostic)
        new, nbytes, kept = worker.answer(tiny("tiny-llama"), None, ids, split, 6, set())
        assert new == ours and kept == split
        assert nbytes == 2 * 2 * split * 2 * 16 * 4  # layers x (K, V) x tokens x kv heads x head dim x fp32


def test_cache_bytes_count_whole_storages():
    worker = _load("kvpress_worker")
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4), 0)
    assert worker.cache_storage_bytes(cache) == 2 * 80 * 4
    cache.layers[0].keys = cache.layers[0].keys[:, :, :3]  # a view (as kvpress trims a cache) still holds its whole storage
    assert worker.cache_storage_bytes(cache) == 2 * 80 * 4
    cache.layers[0].values = cache.layers[0].values[:, :, :3].clone()
    assert worker.cache_storage_bytes(cache) == 80 * 4 + 24 * 4


def test_rerun_answers_only_what_the_journal_lacks(run, monkeypatch):
    mod, out, res = run
    from graphwright.compiled import CompiledModel

    lines = (out / "graphwright_answers.jsonl").read_text().splitlines()
    assert len(lines) == 12  # every answer appended as it finished: 3 settings x 2 cases x 2 modes

    def fail(*a, **k):
        raise AssertionError("an answer the journal holds was computed again")

    monkeypatch.setattr(CompiledModel, "generate", fail)
    monkeypatch.syspath_prepend(str(BENCH))
    args = ["--model", "tiny-llama", "--lengths", "384", "--cases", "2", "--budgets", "0.5", "--recipes", "snapkv(budget={budget})",
            "streaming(sinks=4, window=100)", "--skip-kvpress", "--out", str(out)]
    assert mod.main(args) == 0
    again = json.loads((out / "kvpress_side_by_side.json").read_text())
    assert again["rows"] == res["rows"]
    assert mod.main(args + ["--skip-graphwright"]) == 0  # the table from the journal alone
    assert json.loads((out / "kvpress_side_by_side.json").read_text())["rows"] == res["rows"]
    with pytest.raises(AssertionError, match="computed again"):  # a new budget is a new recipe string: it runs
        mod.main(args[:7] + ["0.25"] + args[8:])


def test_worker_journal_resumes_to_the_same_answers(tiny, tmp_path, monkeypatch):
    worker = _load("kvpress_worker")
    monkeypatch.setitem(sys.modules, "kvpress", type(sys)("kvpress"))  # the dense side needs no press
    monkeypatch.setattr(worker, "_kvpress_version", lambda: "0.0-test")
    monkeypatch.setattr(worker, "_load", lambda folder, attn: tiny("tiny-llama"))
    g = torch.Generator().manual_seed(2)
    cases = [{"id": f"c{i}", "ids": torch.randint(3, 256, (30,), generator=g).tolist(), "split": 20} for i in range(4)]
    spec = {"model": "tiny-llama", "model_dir": "unused", "presses": [], "budgets": [0.5], "modes": ["aware"], "max_new_tokens": 4,
            "eos": [], "cases": cases}
    whole = worker.run({**spec, "journal": str(tmp_path / "whole.jsonl")})["rows"]
    real, calls = worker.answer, []

    def answer(*a):
        if len(calls) == 2:
            raise RuntimeError("session ended")
        calls.append(1)
        return real(*a)

    path = tmp_path / "part.jsonl"
    monkeypatch.setattr(worker, "answer", answer)
    with pytest.raises(RuntimeError, match="session ended"):
        worker.run({**spec, "journal": str(path)})
    assert len(path.read_text().splitlines()) == 2
    calls.clear()
    monkeypatch.setattr(worker, "answer", lambda *a: (calls.append(1), real(*a))[1])
    assert worker.run({**spec, "journal": str(path)})["rows"] == whole and len(calls) == 2
    other = worker.run({**spec, "journal": str(path), "max_new_tokens": 3})["rows"]  # another setting: another key
    assert len(calls) == 6 and all(len(r["new_ids"]) <= 3 for r in other)


def test_table_reads_every_kvpress_answer_for_these_cases(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCH))
    mod, worker = _load("kvpress_side_by_side"), _load("kvpress_worker")
    cases = [{"id": "c0", "ids": [5, 6, 7], "split": 2}, {"id": "c1", "ids": [5, 6, 8], "split": 2}]
    spec = {"model": "m", "model_dir": "x", "max_new_tokens": 4}
    path = tmp_path / "kvpress_answers.jsonl"
    for case, press, model in ((cases[0], "SnapKV", "m"), (cases[1], "TOVA", "m"), (cases[1], "TOVA", "other-model"),
                               ({**cases[0], "ids": [5, 6, 9]}, "Knorm", "m")):  # last: same id, other tokens
        worker.append_journal(path, worker.case_key({**spec, "model": model}, case, press, 0.5, "aware", "0.5.5"),
                              {"id": case["id"], "method": press, "model": model})
    rows = mod.kvpress_journal_rows(path, cases, SimpleNamespace(model="m", max_new_tokens=4))
    assert [(r["id"], r["method"], r["model"]) for r in rows] == [("c0", "SnapKV", "m"), ("c1", "TOVA", "m")]
    assert mod.kvpress_journal_rows(path, cases, SimpleNamespace(model="m", max_new_tokens=8)) == []


def test_suite_key_is_the_long_suites_key(monkeypatch):
    """--import-suite looks answers up under exactly the key graphwright.eval.suite writes for the same prompt."""
    monkeypatch.syspath_prepend(str(BENCH))
    mod = _load("kvpress_side_by_side")
    from graphwright.eval.journal import make_key
    from graphwright.eval.niah import needle_suite
    from graphwright.eval.suite import canonical, case_jobs

    _, tok = mod.load("tiny-llama")
    cases = mod.build_cases(tok, [384], 2, 0)
    jobs = case_jobs(tok, {"niah": needle_suite(tok, lengths=[384], cases=2, seed=0)}, 0, 16, "torch")
    for c, (_, _, kf) in zip(cases, jobs):
        for recipe in ("noop", "snapkv(budget=192)", 'snapkv(budget=192, heads="adaptive")'):
            assert mod.suite_key("tiny-llama", recipe, c, 0, 16) == make_key("tiny-llama", canonical(recipe), seed=0, **kf)


def test_import_suite_copies_answers_and_still_measures_bytes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    mod = _load("kvpress_side_by_side")
    from graphwright.eval.journal import Journal, make_key

    _, tok = mod.load("tiny-llama")
    cases = mod.build_cases(tok, [384], 2, 0)
    suite = Journal(tmp_path / "suite.jsonl")
    c0, c1 = cases
    suite.add(mod.suite_key("tiny-llama", "snapkv(budget=192)", c0, 0, 16), {"answer": f" to {c0['activity']}.", "correct": True})
    stale = mod.suite_key("tiny-llama", "snapkv(budget=192)", c1, 0, 16) | {"case_hash": "0" * 20}  # another prompt: not used
    suite.add(stale, {"answer": f" to {c1['activity']}.", "correct": True})
    suite.add(make_key("tiny-llama", "snapkv(budget=96)", "aware", "niah", 384, c1["id"], 0, stale["case_hash"]), {"answer": "x"})
    out = tmp_path / "out"
    assert mod.main(["--model", "tiny-llama", "--lengths", "384", "--cases", "2", "--budgets", "0.5", "--modes", "aware",
                     "--recipes", "snapkv(budget={budget})", "--skip-kvpress", "--import-suite", str(tmp_path / "suite.jsonl"),
                     "--out", str(out)]) == 0
    rows = {(r["key"]["recipe"], r["key"]["case"]): r["row"] for r in map(json.loads, (out / "graphwright_answers.jsonl").read_text().splitlines())}
    imported, generated = rows[("snapkv(budget=192)", c0["id"])], rows[("snapkv(budget=192)", c1["id"])]
    assert imported["source"] == "suite" and imported["answer"] == f" to {c0['activity']}." and "new_ids" not in imported
    assert "source" not in generated and isinstance(generated["new_ids"], list)
    per_token = 2 * 2 * 2 * 16 * 4  # tiny-llama: layers x (K, V) x kv heads x head dim x fp32
    assert imported["cache_bytes"] == generated["cache_bytes"] == 192 * per_token  # measured here, not copied
    res = json.loads((out / "kvpress_side_by_side.json").read_text())
    scored = {r["id"]: r for r in res["raw"]["graphwright"] if r["method"] == "snapkv(budget={budget})"}
    assert scored[c0["id"]]["correct"] is True and scored[c0["id"]]["answer"] == imported["answer"]
    with pytest.raises(SystemExit, match="no such journal"):
        mod.main(["--model", "tiny-llama", "--lengths", "384", "--cases", "2", "--import-suite", str(tmp_path / "none.jsonl"),
                  "--skip-kvpress", "--out", str(out)])


def test_labels_tell_methods_of_one_pass_apart():
    rep = _load("kvpress_report")
    assert rep.label("snapkv(budget={budget})") == "snapkv"
    assert rep.label("snapkv(budget={budget}, heads='adaptive')") == rep.label('snapkv(budget={budget}, heads="adaptive")') \
        == "snapkv(heads=adaptive)"
    assert rep.label("evict(score='tova', when='prefill', budget={budget})") == "evict(score=tova,when=prefill)"
    assert rep.label("evict(score='knorm', budget={budget})") != rep.label("evict(score='expected_attention', budget={budget})")
    assert rep.label("duo(sinks=4, window=256) + snapkv(budget={budget})") == "duo(sinks=4,window=256)+snapkv"
    # every kvpress press with a counterpart names a label our default-style templates produce
    assert {t for m in rep.SAME_ALGORITHM for t in rep.twins(m)} <= {"dense"} | {rep.label(t) for t in (
        "snapkv(budget={budget})", "snapkv(budget={budget}, heads='adaptive')", "streaming(sinks=4, window={window})",
        "snapkv(budget={budget}, heads='adaptive', split='kvpress')", "evict(score='criticalkv', budget={budget})",
        "evict(score='criticalkv', budget={budget}, rule='adaptive')",
        "evict(score='tova', when='prefill', budget={budget})", "evict(score='knorm', budget={budget})",
        "evict(score='expected_attention', budget={budget})", "duo(sinks=4, window=256)",
        "evict(score='knorm', budget={budget}, sinks=4, window={window})", "evict(score='keydiff', budget={budget})",
        "evict(score='chunkkv', budget={budget})", "snapkv(budget={budget}, pyramid=20)",
        "evict(score='lagkv', budget={budget})", "evict(score='qfilter', budget={budget})",
        "evict(score='finch', budget={budget}, window={question}, rerotate=True)",
        "evict(score='finch', budget={budget}, window={question})",
        "evict(score='finch', budget={budget}, window={question}, chunk=256)",
        "evict(score='kvzip', budget={frac})")}
    assert all(n in rep.SAME_ALGORITHM if isinstance(n, str) else n[1] in rep.twins(n[0]) for n in rep.NEAREST)
    assert rep.twins("AdaKV(SnapKV)") == ("snapkv(heads=adaptive,split=kvpress)", "snapkv(heads=adaptive)")
    assert rep.twins("Finch(rerotate)")[0] == "evict(score=finch,rerotate=True)"  # same algorithm since session 15
    assert not rep.is_nearest("Finch(rerotate)", "evict(score=finch,rerotate=True)")
    assert rep.label("evict(score='knorm', budget={budget}, sinks=4, window={window})") == "evict(score=knorm,sinks=4)"


def test_twin_pairs_a_press_with_its_own_counterpart_only():
    """AdaKV is compared with snapkv(heads=adaptive), never with plain snapkv (one pass name, two methods)."""
    rep = _load("kvpress_report")
    mk = lambda method, ids, side_budget=0.5: [{"method": method, "budget": side_budget, "mode": "aware", "id": f"c{i}", "new_ids": x,  # noqa: E731
                                                "answer": str(x), "correct": True, "length": 8, "cache_bytes": 1.0} for i, x in enumerate(ids)]
    ours = mk("dense", [[1], [2]], None) + mk("snapkv(budget={budget})", [[1], [2]]) + mk("snapkv(budget={budget}, heads='adaptive')", [[1], [9]])
    theirs = mk("dense", [[1], [2]], None) + mk("SnapKV", [[1], [2]]) + mk("AdaKV(SnapKV)", [[1], [2]])
    rows = {(r["side"], r["method"]): r for r in rep.summarise({"graphwright": ours, "kvpress": theirs})}
    assert rows[("kvpress", "SnapKV")]["same_answers_as_graphwright"] == 1.0
    assert rows[("kvpress", "AdaKV(SnapKV)")]["same_answers_as_graphwright"] == 0.5
    assert rows[("kvpress", "dense")]["same_answers_as_graphwright"] == 1.0
    # a graphwright row imported from the suite has the decoded answer only: compared as text
    ours[2] = {k: v for k, v in ours[2].items() if k != "new_ids"}
    rows = {(r["side"], r["method"]): r for r in rep.summarise({"graphwright": ours, "kvpress": theirs})}
    assert rows[("kvpress", "SnapKV")]["same_answers_as_graphwright"] == 1.0
    # pairs: per mode (an agnostic press meets the agnostic twin only), AdaKV marked nearest (its split rule differs)
    agn = lambda rows: [{**r, "mode": "agnostic", "new_ids": [7]} for r in rows]  # noqa: E731
    ps = {(p["press"], p["mode"]): p for p in rep.pairs({"raw": {"graphwright": ours + agn(ours[2:4]), "kvpress": theirs + agn(theirs[2:4])}})}
    assert set(ps) == {("dense", "aware"), ("SnapKV", "aware"), ("AdaKV(SnapKV)", "aware"), ("SnapKV", "agnostic")}
    assert ps[("SnapKV", "agnostic")]["identical"] == 2 and ps[("SnapKV", "aware")]["identical"] == 2
    assert ps[("AdaKV(SnapKV)", "aware")]["nearest"] and not ps[("SnapKV", "aware")]["nearest"]
    assert ps[("AdaKV(SnapKV)", "aware")]["identical"] == 1
    # AdaKV with graphwright's kvpress split as well: two rows, the split twin first and not nearest
    split = mk("snapkv(budget={budget}, heads='adaptive', split='kvpress')", [[1], [2]])
    rows = [p for p in rep.pairs({"raw": {"graphwright": ours + split, "kvpress": theirs}}) if p["press"] == "AdaKV(SnapKV)"]
    assert [(p["nearest"], p["identical"]) for p in rows] == [(False, 2), (True, 1)]
    summary = {(r["side"], r["method"]): r for r in rep.summarise({"graphwright": ours + split, "kvpress": theirs})}
    assert summary[("kvpress", "AdaKV(SnapKV)")]["same_answers_as_graphwright"] == 1.0  # the preferred twin


def test_kvpress_journals_of_parallel_workers_are_merged(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCH))
    mod, worker = _load("kvpress_side_by_side"), _load("kvpress_worker")
    cases = [{"id": "c0", "ids": [5, 6, 7], "split": 2}]
    spec = {"model": "m", "model_dir": "x", "max_new_tokens": 4}
    for name, press in (("kvpress_answers.jsonl", "dense"), ("kvpress_answers.w2.jsonl", "TOVA"), ("other.jsonl", "Knorm")):
        worker.append_journal(tmp_path / name, worker.case_key(spec, cases[0], press, 0.5, "aware", "0.5.5"), {"id": "c0", "method": press})
    rows = mod.kvpress_journal_rows(tmp_path, cases, SimpleNamespace(model="m", max_new_tokens=4))
    assert [r["method"] for r in rows] == ["dense", "TOVA"]
    assert [r["method"] for r in mod.kvpress_journal_rows(tmp_path / "other.jsonl", cases, SimpleNamespace(model="m", max_new_tokens=4))] == ["Knorm"]


def test_worker_can_leave_dense_out(tiny, tmp_path, monkeypatch):
    worker = _load("kvpress_worker")
    monkeypatch.setitem(sys.modules, "kvpress", type(sys)("kvpress"))
    monkeypatch.setattr(worker, "_kvpress_version", lambda: "0.0-test")
    monkeypatch.setattr(worker, "_load", lambda folder, attn: tiny("tiny-llama"))
    spec = {"model": "tiny-llama", "model_dir": "unused", "presses": [], "budgets": [0.5], "modes": ["aware"], "max_new_tokens": 2,
            "eos": [], "cases": [{"id": "c0", "ids": list(range(3, 20)), "split": 10}]}
    assert len(worker.run(spec)["rows"]) == 1 and worker.run({**spec, "dense": False})["rows"] == []


def test_table_only_rebuilds_the_table_without_weights(run, monkeypatch):
    mod, out, res = run
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(mod, "load", lambda name: (_ for _ in ()).throw(AssertionError("weights loaded")))
    monkeypatch.setattr(mod, "load_tokenizer", lambda name: __import__("graphwright.eval.bytetok", fromlist=["x"]).ByteTokenizer())
    assert mod.main(["--model", "tiny-llama", "--table-only", "--out", str(out)]) == 0
    again = json.loads((out / "kvpress_side_by_side.json").read_text())
    assert sorted(map(json.dumps, again["rows"])) == sorted(map(json.dumps, res["rows"]))
    with pytest.raises(SystemExit, match="cases.json"):
        mod.main(["--model", "tiny-llama", "--table-only", "--out", str(out / "empty")])


def _fake_worker(monkeypatch):
    """kvpress_worker with a stand-in kvpress (no model load, one press ``Fake``): its journal logic alone."""
    worker = _load("kvpress_worker")
    monkeypatch.setitem(sys.modules, "kvpress", type(sys)("kvpress"))
    monkeypatch.setattr(worker, "_kvpress_version", lambda: "0.0-test")
    monkeypatch.setattr(worker, "_load", lambda folder, attn: None)
    monkeypatch.setattr(worker, "_presses", lambda spec=None: {"Fake": lambda ratio: None})
    return worker


def test_worker_rounds_grow_every_cell_together(tmp_path, monkeypatch):
    """spec["round"] R: R cases for every job in turn; the same rows as one job after another, and a stop leaves equal cells."""
    worker = _fake_worker(monkeypatch)
    calls = []

    def answer(model, press, ids, split, max_new_tokens, eos, delim=None):
        calls.append(ids[0])
        return [ids[0] % 7], 8, split

    monkeypatch.setattr(worker, "answer", answer)
    cases = [{"id": f"c{i}", "ids": [i, 1, 2], "split": 3} for i in range(5)]
    spec = {"model": "m", "model_dir": "unused", "presses": ["Fake"], "budgets": [0.5, 0.25], "modes": ["aware"],
            "max_new_tokens": 2, "eos": [], "cases": cases}
    whole = worker.run(spec)["rows"]
    assert calls == [0, 1, 2, 3, 4] * 3
    calls.clear()
    rounds = worker.run({**spec, "round": 2, "journal": str(tmp_path / "r.jsonl")})["rows"]
    assert calls == [0, 1] * 3 + [2, 3] * 3 + [4] * 3
    key = lambda r: (r["method"], str(r["budget"]), r["id"])  # noqa: E731
    assert sorted(rounds, key=key) == sorted(whole, key=key)
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    firsts = [json.loads(ln)["row"] for ln in lines[:12]]  # after two rounds: every cell holds the same 4 cases
    assert {(r["method"], r["budget"]): sorted(x["id"] for x in firsts if (x["method"], x["budget"]) == (r["method"], r["budget"]))
            for r in firsts} == {k: ["c0", "c1", "c2", "c3"] for k in (("dense", None), ("Fake", 0.5), ("Fake", 0.25))}


def test_spread_order_prefixes_span_the_depths():
    mod = _load("kvpress_side_by_side")
    order = [c["id"] for c in mod.spread([{"id": i} for i in range(50)])]
    assert sorted(order) == list(range(50))
    assert order[:5] == [0, 10, 20, 30, 40] and sorted(order[:10]) == list(range(0, 50, 5)) and order[10:15] == [2, 12, 22, 32, 42]
    for n in (5, 10, 15, 20, 25):  # every prefix of 5k cases holds k cases of each fifth of the depths
        assert all(sum(lo <= i < lo + 10 for i in order[:n]) == n // 5 for lo in range(0, 50, 10))
    assert [c["id"] for c in mod.spread([{"id": i} for i in range(7)])] == [0, 5, 2, 4, 1, 6, 3]
    with pytest.raises(SystemExit):
        mod.parse_args(["--first", "0"])


def test_first_answers_a_spread_prefix_and_reuses_measured_bytes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    mod = _load("kvpress_side_by_side")
    from graphwright.compiled import CompiledModel

    out = tmp_path / "out"
    args = ["--model", "tiny-llama", "--lengths", "384", "--cases", "6", "--budgets", "0.5", "--modes", "aware",
            "--recipes", "snapkv(budget={budget})", "--skip-kvpress", "--out", str(out)]
    assert mod.main(args + ["--first", "2"]) == 0
    rows = [json.loads(ln) for ln in (out / "graphwright_answers.jsonl").read_text().splitlines()]
    assert sorted({r["key"]["case"] for r in rows}) == ["L384-c0", "L384-c5"]  # spread order: 0, 5, 2, 4, 1, 3
    assert len(json.loads((out / "cases.json").read_text())) == 6  # every case written; the table covers the journal
    real, prefill_only = CompiledModel.generate, []

    def generate(self, ids, *a, **k):
        prefill_only.append(k.get("max_new_tokens") == 1)
        return real(self, ids, *a, **k)

    monkeypatch.setattr(CompiledModel, "generate", generate)
    assert mod.main(args + ["--first", "3"]) == 0
    rows = [json.loads(ln) for ln in (out / "graphwright_answers.jsonl").read_text().splitlines()]
    assert sorted({r["key"]["case"] for r in rows}) == ["L384-c0", "L384-c2", "L384-c5"]
    assert prefill_only == [False, False]  # dense and snapkv: one new answer each, bytes from the journal (no prefill-only run)
    by = {}
    for r in rows:
        by.setdefault(r["key"]["recipe"], set()).add(r["row"]["cache_bytes"])
    assert all(len(v) == 1 for v in by.values()) and by["snapkv(budget=192)"] == {192 * 2 * 2 * 2 * 16 * 4}


def test_worker_skips_what_other_journals_in_its_folder_hold(tmp_path, monkeypatch):
    """A new spec (its own journal) answers only the cases no sibling journal holds; a sibling's torn line stays."""
    worker = _fake_worker(monkeypatch)
    calls = []
    monkeypatch.setattr(worker, "answer", lambda model, press, ids, *a: (calls.append(ids[0]), ([ids[0]], 8, 3))[1])
    cases = [{"id": f"c{i}", "ids": [i, 1, 2], "split": 3} for i in range(3)]
    spec = {"model": "m", "model_dir": "unused", "presses": ["Fake"], "budgets": [0.5], "modes": ["aware"], "max_new_tokens": 2,
            "eos": [], "dense": False}
    worker.run({**spec, "cases": cases[:2], "journal": str(tmp_path / "kvpress_answers.a.jsonl")})
    assert calls == [0, 1]
    torn = tmp_path / "kvpress_answers.b.jsonl"
    torn.write_text('{"key": {"half')
    calls.clear()
    rows = worker.run({**spec, "cases": cases, "journal": str(tmp_path / "kvpress_answers.c.jsonl")})["rows"]
    assert calls == [2] and [r["id"] for r in rows] == ["c0", "c1", "c2"]
    assert torn.read_text() == '{"key": {"half'  # another worker's file is never cut
    assert len((tmp_path / "kvpress_answers.c.jsonl").read_text().splitlines()) == 1


def _kvpress_adakv_loop(scores, window, n_kept, alpha):
    """kvpress AdaKVPress's rule as a loop over a full-length [Hk, S] score (the window last, scored above everything):
    each head's top int(alpha * n_kept) are forced, then the layer keeps its top Hk * n_kept entries."""
    hk, S = scores.shape
    s = [[float(scores[h, j]) for j in range(S - window)] + [1e9] * window for h in range(hk)]
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
    for h in range(hk):
        for j in sorted(range(S), key=lambda j: (-s[h][j], j))[:n_safe]:
            s[h][j] = float("inf")
    entries = sorted(((-s[h][j], h * S + j) for h in range(hk) for j in range(S)))[:hk * n_kept]
    keep = torch.zeros(hk, S, dtype=torch.bool)
    for _, f in entries:
        keep[f // S, f % S] = True
    return keep


def test_adakv_split_rules_of_kvpress_and_the_official_code():
    """bench/kvpress_adakv_kept.py: kvpress's split (forced top share, then a global top-k) against a loop over its rule; the
    official safeguard (graphwright's) gives every head more of a floor and the two part on dispersed scores."""
    kept = _load("kvpress_adakv_kept")
    from graphwright.ops.adakv_ref import adaptive_counts

    g = torch.Generator().manual_seed(0)
    window = 4
    for trial in range(6):
        hk, S, c = 3, 40, [6, 10, 16][trial % 3]
        scale = torch.tensor([[1.0], [0.05], [3.0]]) if trial % 2 else torch.ones(hk, 1)
        scores = torch.rand(hk, S, generator=g) * scale
        cand = torch.zeros(hk, S, dtype=torch.bool)
        cand[:, :S - window] = True
        for alpha in (0.0, 0.2, 0.5, 1.0):
            counts = kept.kvpress_counts(scores, cand, c, alpha, window=window)
            loop = _kvpress_adakv_loop(scores, window, c + window, alpha)
            assert loop[:, S - window:].all()
            assert counts == loop[:, :S - window].sum(-1).tolist()
            assert torch.equal(kept.keep_from_counts(scores, cand, counts), loop & cand)
            assert sum(counts) == hk * c
            assert kept.ffy0_counts(scores, cand, c, alpha) == adaptive_counts(scores, cand, c, alpha)
        # floor 0: both are the global top-k
        assert kept.kvpress_counts(scores, cand, c, 0.0, window=window) == kept.ffy0_counts(scores, cand, c, 0.0)
    # one head holds all the mass: kvpress leaves the others int(0.2 * (c + w)) - w = 19 prefix tokens, the official
    # rule round(0.2 * c) = 45 (c = 224, w = 32: the 25% cell at 1,024 tokens)
    scores = torch.full((3, 1000), 1e-3)
    scores[0] = 1.0
    cand = torch.ones(3, 1000, dtype=torch.bool)
    assert kept.kvpress_counts(scores, cand, 224, 0.2, window=32) == [634, 19, 19]
    assert kept.ffy0_counts(scores, cand, 224, 0.2) == [582, 45, 45]


def test_best_vs_best_picks_kvpress_best_and_pairs_cases():
    best = _load("kvpress_best")
    ids = ["a", "b", "c", "d"]

    def rows(method, budget, correct, nbytes, side_mode="aware"):
        return [{"method": method, "budget": budget, "mode": side_mode, "id": i, "correct": c, "cache_bytes": nbytes}
                for i, c in zip(ids, correct)]

    kv = (rows("SnapKV", 0.5, [1, 1, 0, 0], 2 << 20) + rows("TOVA", 0.5, [1, 1, 1, 0], 3 << 20)
          + rows("Knorm", 0.5, [1, 1, 1, 1], 1 << 20)[:3]  # 3 of 4 cases: not a candidate
          + rows("Knorm", 0.5, [1, 1, 1, 1], 1 << 20, "agnostic") + rows("dense", None, [1, 1, 1, 1], 9 << 20))
    ours = rows("snapkv(budget={budget})", 0.5, [1, 1, 1, 1], 4 << 20) + rows("duo(sinks=4)", None, [0, 1, 1, 0], 5 << 20)
    res = best.compare(ours, kv, ids, [(0.5, "snapkv(budget={budget})"), (0.5, "duo(sinks=4)")], modes=("aware",))
    assert [r["kvpress"] for r in res] == ["TOVA", "TOVA"] and res[0]["kvpress_ranking"] == [("TOVA", 0.75), ("SnapKV", 0.5)]
    assert [r["graphwright_best"] for r in res] == [True, False]
    assert res[0]["kvpress_accuracy"][0] == 0.75 and res[0]["graphwright_accuracy"][0] == 1.0
    assert res[0]["delta"][0] == 0.25 and res[0]["verdict"] == "level"  # one case of four: the interval spans 0
    assert res[0]["cases_gw_only"] == 1 and res[0]["cases_kv_only"] == 0
    assert res[0]["kvpress_mib"] == 3.0 and res[0]["graphwright_mib"] == 4.0 and res[1]["graphwright_mib"] == 5.0
    assert res[1]["delta"][0] == -0.25 and res[1]["cases_kv_only"] == 1 and res[1]["cases_gw_only"] == 0
    assert best.verdict(0.05, 0.3) == "ahead" and best.verdict(-0.3, -0.05) == "behind" and best.verdict(-0.1, 0.1) == "level"
    with pytest.raises(SystemExit, match="holds 0 of the 4"):
        best.compare(ours, kv, ids, [(0.25, "snapkv(budget={budget})")])
    # both modes (the default): the agnostic Knorm competes too, labelled; a graphwright agnostic pair reads agnostic rows
    ours += rows("evict(score='kvzip', budget={frac})", 0.5, [1, 0, 1, 1], 1 << 19, "agnostic")
    res = best.compare(ours, kv, ids, [(0.5, "snapkv(budget={budget})"), (0.5, "agnostic:evict(score='kvzip', budget={frac})")])
    assert res[0]["kvpress_ranking"] == [("Knorm (agnostic)", 1.0), ("TOVA", 0.75), ("SnapKV", 0.5)]
    assert [r["kvpress"] for r in res] == ["Knorm (agnostic)"] * 2 and res[0]["kvpress_mib"] == 1.0
    assert res[1]["graphwright_mode"] == "agnostic" and res[1]["graphwright_accuracy"][0] == 0.75
    assert res[1]["graphwright_mib"] == 0.5 and res[1]["delta"][0] == -0.25
    assert [r["graphwright_best"] for r in res] == [True, False]  # 1.0 beats 0.75 whatever the bytes
    md = best.markdown(res, 4)
    assert "`Knorm (agnostic)`" in md and "budget={frac})` (agnostic)" in md and "**best**" in md
    with pytest.raises(SystemExit, match=r"\(agnostic\) at 0.25: the journal holds 0 of the 4"):
        best.compare(ours, kv, ids, [(0.25, "agnostic:evict(score='kvzip', budget={frac})")])


def test_agnostic_kept_recovers_gathered_positions():
    kept = _load("kvpress_agnostic_kept")
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 50, 8, generator=g)
    idx = torch.stack([torch.randperm(50, generator=g)[:20] for _ in range(3)])  # topk order, not sorted
    got = kept.positions_of(keys.gather(1, idx[..., None].expand(-1, -1, 8)), keys)
    assert got == [sorted(row.tolist()) for row in idx]
    with pytest.raises(SystemExit, match="matches no given key"):
        kept.positions_of(keys[:, :5] + 1.0, keys)
    assert kept.parse_job("CriticalKV(SnapKV):0.25:L1024-c3") == ("CriticalKV(SnapKV)", 0.25, "L1024-c3")
    with pytest.raises(SystemExit, match="PRESS:BUDGET:CASE"):
        kept.parse_job("TOVA-0.5")


def test_qfilters_file_holds_the_filters_evict_calibrates(tmp_path):
    """The kvpress QFilter twin reads the very filters ``evict(score='qfilter')`` calibrates without a file."""
    from graphwright.capture import capture
    from graphwright.passes.pipeline import make_context
    from graphwright.passes.qfilter_calibrate import calibrate_filters, load_filters

    mod = _load("kvpress_side_by_side")
    model, tok = mod.load("tiny-llama")
    path = mod.qfilters_file("tiny-llama", model, tok, folder=tmp_path)
    sg = capture(model)
    got = load_filters(path, sg.info)
    assert path.name == "qfilters-tiny-llama.safetensors"
    assert torch.equal(got, calibrate_filters(sg, make_context(model, tok)))


def test_finch_delimiter_is_inserted_at_the_split_and_dropped_by_the_hook(tiny, compiled_tiny):
    """The worker's Finch path: the delimiter goes before ids[split] and FinchPress's embedding hook (here a stand-in
    with the same rule) drops it again, so with nothing evicted the answer is graphwright's dense one."""
    import contextlib

    worker = _load("kvpress_worker")
    model = tiny("tiny-llama")
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = compiled_tiny("tiny-llama").generate(torch.tensor([ids]), max_new_tokens=6)[0, 40:].tolist()
    seen = []

    class Drop:  # FinchPress.embed_token_forward_hook's rule; delimiter id 1 (ids avoid 0..2)
        rerotate_keys = False

        def hook(self, module, inp, out):
            if inp[0].shape[1] > 1:
                seen.append(inp[0][0].tolist())
                return out[:, inp[0][0] != 1]
            return out

        @contextlib.contextmanager
        def __call__(self, m):
            h = m.model.embed_tokens.register_forward_hook(self.hook)
            try:
                yield
            finally:
                h.remove()

    new, _, kept = worker.answer(model, Drop(), ids, 40, 6, set(), delim=(1, 28))
    assert seen == [ids[:28] + [1] + ids[28:]] and new == ours and kept == 40


def test_question_field_is_filled_per_case():
    mod = _load("kvpress_side_by_side")
    t = "evict(score='finch', budget={budget}, window={question})"
    assert mod.fill(t, 0.25, 1024, question=37) == "evict(score='finch', budget=256, window=37)"
    with pytest.raises(SystemExit, match="only a case fills"):
        mod.fill(t, 0.25, 1024)
