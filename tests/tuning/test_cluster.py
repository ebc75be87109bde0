"""graphwright.tune(scheduler=...) on a local Dask cluster of two worker processes (tiny-llama, byte tokenizer):
each trial runs once, the initial design equals a serial run's, a killed worker's trial is retried."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import distributed
import pytest

from graphwright.errors import GraphwrightError
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.tuning.study import STUDY_NAME, open_storage, tune

SMALL = {"windows": 1, "window": 40, "prefix": 20}
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as c:
        yield c


@pytest.mark.slow  # ~5 min on the loaded 2-core machine (two worker processes load and capture the model)
def test_cluster_runs_each_trial_once_and_its_initial_design_matches_a_serial_run(cluster, tmp_path):
    """6 trials, population 4: trials 0-3 are the seeded initial design (as a serial run's), 4-5 are drawn by the workers' NSGA-II."""
    kw = dict(template="streaming", budget=0.9, population=4, eval_settings=SMALL, threads=1, outputs=False)
    par = tune("tiny-llama", TOK, trials=6, scheduler=cluster.scheduler_address, storage=f"sqlite:///{tmp_path / 'study.db'}",
               out=tmp_path / "par", **kw)["trials"]
    ser = tune("tiny-llama", TOK, trials=4, out=tmp_path / "ser", **kw)["trials"]
    assert [t["number"] for t in par] == list(range(6)) and all(t["state"] == "COMPLETE" for t in par)
    assert not any(t.get("lost") or t.get("retry_of") is not None for t in par)
    assert len({t["worker"] for t in par}) == 2 and all(str(t["worker"]).startswith("tcp://") for t in par)  # both cluster workers ran trials
    assert [(t["params"], t["values"]) for t in par[:4]] == [(t["params"], t["values"]) for t in ser]
    assert all(par[i]["params"] for i in (4, 5))  # sampled in the worker, recorded once
    assert not (tmp_path / "par" / "study.journal").exists()  # the study lives in the database given


def test_without_the_extra_scheduler_names_it_and_bad_arguments_are_refused(monkeypatch, tmp_path, capsys):
    from graphwright.cli.main import main

    with pytest.raises(ValueError, match="pass its name or path, not a loaded model"):
        tune(object.__new__(type("M", (), {"forward": None})), TOK, template="streaming", scheduler="tcp://127.0.0.1:1", out=tmp_path)
    with pytest.raises(ValueError, match="leave workers at 1"):
        tune("tiny-llama", TOK, template="streaming", scheduler="tcp://127.0.0.1:1", workers=2, out=tmp_path)
    with pytest.raises(ValueError, match="Dask scheduler address like tcp://HOST:8786"):
        tune("tiny-llama", TOK, template="streaming", scheduler="127.0.0.1:1", out=tmp_path)
    with pytest.raises(ValueError, match="storage must be a database URL"):
        tune("tiny-llama", TOK, template="streaming", storage="", out=tmp_path)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the extra were not installed
    with pytest.raises(GraphwrightError, match=r"pip install 'graphwright\[cluster\]'"):
        tune("tiny-llama", TOK, template="streaming", scheduler="tcp://127.0.0.1:1", out=tmp_path)
    argv = ["tune", "--model", "tiny-llama", "--recipe", "streaming", "--trials", "1", "--scheduler", "tcp://127.0.0.1:1",
            "--out", str(tmp_path / "cli")]
    assert main(argv) == 2 and "graphwright[cluster]" in capsys.readouterr().err


def _kill_the_worker_of_a_running_trial(spec, killed):
    import optuna

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(spec))
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # noqa: BLE001  (the journal is being created)
            running = []
        for trial in running:
            pid = trial.user_attrs.get("pid")
            if pid is not None and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)  # the Dask worker process that runs this trial
                killed.append(trial.number)
                return
        time.sleep(0.2)


@pytest.mark.slow  # ~5 min on the loaded 2-core machine
def test_a_killed_cluster_workers_trial_is_retried(cluster, tmp_path):
    out = tmp_path / "kill"
    spec = str(out / "study.journal")  # the default storage: a journal file (on a filesystem every worker reaches)
    killed = []
    watcher = threading.Thread(target=_kill_the_worker_of_a_running_trial, args=(spec, killed), daemon=True)
    watcher.start()
    slow = {"windows": 3, "window": 256, "prefix": 32}  # trials of a few seconds, so the watcher sees one RUNNING
    r = tune("tiny-llama", TOK, template="streaming", budget=0.9, trials=3, population=3, scheduler=cluster.scheduler_address,
             out=out, eval_settings=slow, threads=1, outputs=False)
    watcher.join(timeout=5)
    assert killed, "the watcher never saw a running trial"
    trials = r["trials"]
    lost = [t for t in trials if t.get("lost")]
    assert [t["number"] for t in lost] == killed and all(t["state"] == "FAIL" for t in lost)
    ended = [t for t in trials if not t.get("lost")]
    assert len(ended) == 3 and all(t["state"] == "COMPLETE" for t in ended)  # exactly the asked-for count, none lost
    (retry,) = [x for x in ended if x.get("retry_of") == killed[0]]  # the lost trial's params ran again, once
    assert retry["params"] == lost[0]["params"] and retry["pid"] != lost[0]["pid"]
