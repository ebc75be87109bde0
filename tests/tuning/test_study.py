"""graphwright.tune on tiny-llama with the byte tokenizer: scores, Pareto outputs, resume, parallel workers, CLI."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from graphwright.cli.main import main
from graphwright.compile import compile as gw_compile
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.models import load_model
from graphwright.recipes import Recipe
from graphwright.tuning.objectives import Evaluator, split_windows
from graphwright.tuning.report import pareto_front
from graphwright.tuning.study import tune

SMALL = {"windows": 1, "window": 40, "prefix": 20}
TOK = ByteTokenizer()


def _stop(seen, m):
    seen.append(m)
    raise RuntimeError("stop")


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


def test_identity_scores_one_and_streaming_holds_sinks_plus_window(llama):
    ev = Evaluator(llama, TOK, **SMALL)
    base = ev.base()
    same = ev.evaluate("noop", base=base)
    assert same["kv_fraction"] == 1.0 and same["ppl_ratio"] == 1.0
    s = ev.evaluate("streaming(sinks=4, window=11)", base=base)
    assert s["kv_fraction"] == pytest.approx(15 / 39)  # dense holds window - 1 = 39 tokens after the last decode step
    assert s["ppl_ratio"] != 1.0
    seen = []
    with pytest.raises(RuntimeError, match="stop"):
        ev.evaluate("streaming(sinks=4, window=11)", base=base, proxy_check=lambda m: _stop(seen, m))
    assert seen[0]["proxy"] and seen[0]["kv_fraction"] == pytest.approx(15 / 39)
    cal, held = split_windows(TOK, "calibration", 2, 40), split_windows(TOK, "heldout", 2, 40)
    assert not any(torch.equal(a, b) for a in cal for b in held)
    with pytest.raises(ValueError, match="split must be one of"):
        split_windows(TOK, "train", 1, 40)


def test_serial_study_writes_the_front_the_tomls_and_the_held_out_winner(llama, tmp_path):
    r = tune(llama, TOK, template="streaming(sinks=4)", budget=0.45, trials=4, population=4, out=tmp_path, eval_settings=SMALL)
    trials = r["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert len(done) + len(pruned) == 4 and done
    for t in done:  # KV bytes held: sinks + window tokens of the 39 dense ones
        assert t["kv_fraction"] == pytest.approx((4 + t["params"]["0.streaming.window"]) / 39) and t["kv_fraction"] <= 0.45
    for t in pruned:  # pruned after the first window: over the budget (front pruning is off by default)
        assert t["pruned_by"] == "budget" and t["windows_scored"] == 1
        assert (4 + t["params"]["0.streaming.window"]) / 39 > 0.45
    front = r["pareto"]
    assert front == pareto_front(trials, 0.45) and front
    for p in front:
        assert not any(o["kv_fraction"] <= p["kv_fraction"] and o["ppl_ratio"] <= p["ppl_ratio"] and
                       (o["kv_fraction"], o["ppl_ratio"]) != (p["kv_fraction"], p["ppl_ratio"]) for o in done)
        assert Recipe.parse(p["toml"]) == Recipe.parse(p["recipe"])
    w = r["winner"]
    assert w["calibration"]["ppl_ratio"] == min(p["ppl_ratio"] for p in front)
    cm = gw_compile(llama, recipe=w["toml"], tokenizer=TOK)  # the TOML file is what compile() takes
    assert str(cm.recipe) == w["recipe"]
    assert w["heldout"]["kv_fraction"] == pytest.approx(w["calibration"]["kv_fraction"])  # same cap on other text
    assert w["heldout"]["ppl_ratio"] != w["calibration"]["ppl_ratio"]  # re-measured, not copied
    for f in ("pareto.json", "pareto.md", "pareto.png", "winner.json", "winner_report.txt", "study.journal"):
        assert (tmp_path / f).stat().st_size > 0
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["front"][0]["recipe"] == front[0]["recipe"]
    assert saved["counts"]["pruned"] == len(pruned) == sum(saved["counts"]["pruned_by"].values())
    assert "streaming" in (tmp_path / "winner_report.txt").read_text()


def test_two_workers_run_each_trial_once_and_match_a_serial_run(tmp_path):
    """4 trials = the seeded initial design (enqueued): each runs once, in either worker, with the serial run's values."""
    kw = dict(template="streaming", budget=0.9, trials=4, population=4, eval_settings=SMALL, threads=1, outputs=False)
    par = tune("tiny-llama", TOK, workers=2, out=tmp_path / "par", **kw)["trials"]
    ser = tune("tiny-llama", TOK, workers=1, out=tmp_path / "ser", **kw)["trials"]
    assert [t["number"] for t in par] == [0, 1, 2, 3] and all(t["state"] == "COMPLETE" for t in par)
    assert len({t["worker"] for t in par}) == 2  # both workers took trials
    assert [(t["params"], t["values"]) for t in par] == [(t["params"], t["values"]) for t in ser]


def test_cli_tune_and_resume(tmp_path, capsys):
    argv = ["tune", "--model", "tiny-llama", "--recipe", "streaming(sinks=4)", "--kv-budget", "0.5", "--trials", "2",
            "--population", "2", "--windows", "1", "--window", "40", "--prefix", "20", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 trials" in out and "Pareto front" in out
    assert main(argv) == 2 and "already holds a study" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert "4 trials" in capsys.readouterr().out  # the journal held 2; --resume ran 2 more
    result = json.loads((tmp_path / "result.json").read_text())
    assert [t["number"] for t in result["trials"]] == [0, 1, 2, 3]
    assert main([*argv[:-1], str(tmp_path / "none"), "--resume"]) == 2 and "no study to resume" in capsys.readouterr().err
    assert main([*argv, "--prefix", "39"]) == 2 and "--prefix must be at most" in capsys.readouterr().err


def _kill_one_worker_when_running(journal_dir, killed):
    """Wait for a RUNNING trial in the journal, then kill one spawned worker of this test process (SIGKILL)."""
    import optuna
    import psutil

    from graphwright.tuning.study import STUDY_NAME, _storage

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not killed:
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(journal_dir))
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # noqa: BLE001  (the journal is being created)
            running = []
        pids = {}
        for p in psutil.Process().children(recursive=True):
            try:
                if "spawn_main" in " ".join(p.cmdline()):
                    pids[p.pid] = p
            except psutil.Error:  # exited meanwhile
                pass
        for trial in running:  # kill the worker that runs this trial (its pid is recorded when the trial starts)
            if trial.user_attrs.get("pid") in pids:
                try:
                    pids[trial.user_attrs["pid"]].kill()
                except psutil.Error:  # it finished the trial and exited meanwhile: look again
                    continue
                killed.append(trial.number)
                return
        time.sleep(0.2)


def test_a_killed_workers_trial_is_retried(tmp_path):
    killed = []
    out = tmp_path / "kill"
    watcher = threading.Thread(target=_kill_one_worker_when_running, args=(out, killed), daemon=True)
    watcher.start()
    # trials of a few seconds (3 windows of 224 decode steps), so the watcher's journal polls see one RUNNING
    slow = {"windows": 3, "window": 256, "prefix": 32}
    r = tune("tiny-llama", TOK, template="streaming", budget=0.9, trials=3, population=3, workers=2, out=out, eval_settings=slow,
             threads=1, outputs=False)
    watcher.join(timeout=5)
    assert killed, "the watcher never saw a running trial"
    trials = r["trials"]
    lost = [t for t in trials if t.get("lost")]
    assert lost and all(t["state"] == "FAIL" for t in lost)
    ended = [t for t in trials if not t.get("lost")]
    assert len(ended) == 3 and all(t["state"] == "COMPLETE" for t in ended)  # exactly the asked-for count, none lost
    for t in lost:  # each lost trial's params ran again, once
        retries = [x for x in ended if x.get("retry_of") == t["number"]]
        assert len(retries) == 1 and (not t["params"] or retries[0]["params"] == t["params"])


def test_resume_retries_a_trial_a_killed_run_left_running(llama, tmp_path):
    import optuna

    from graphwright.tuning.space import distributions, search_space
    from graphwright.tuning.study import STUDY_NAME, _storage

    kw = dict(template="streaming", budget=0.9, population=2, out=tmp_path, eval_settings=SMALL, outputs=False)
    tune(llama, TOK, trials=1, **kw)
    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(tmp_path))
    left = study.ask(distributions(search_space("streaming", SMALL["prefix"])))  # what a killed run leaves: RUNNING
    r = tune(llama, TOK, trials=1, resume=True, **kw)["trials"]
    assert [(t["number"], t["state"], bool(t.get("lost"))) for t in r] == [(0, "COMPLETE", False), (1, "FAIL", True), (2, "COMPLETE", False)]
    assert r[2]["retry_of"] == left.number == 1 and r[2]["params"] == r[1]["params"] == left.params
