"""The first-window proxy pruner (``tuning.pruning.ProxyFrontPruner``): its rules, its wait for earlier trials, and a
2-worker study that prunes exactly what a serial study with the same seed prunes."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from graphwright.eval.bytetok import ByteTokenizer
from graphwright.tuning.pruning import PROXY_STEP, ProxyFrontPruner, record_proxy
from graphwright.tuning.study import STUDY_NAME, _storage, tune

TOK = ByteTokenizer()
GOOD, BAD = {"0.h2o.heavy": 0.3, "0.h2o.recent": 0.05}, {"0.h2o.heavy": 0.05, "0.h2o.recent": 0.3}
DIST = {"x": FloatDistribution(0, 1)}


def _study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(directions=["minimize", "minimize"])


def _done(study, kv, ppl, state=TrialState.COMPLETE):
    t = create_trial(state=state, values=[kv, ppl] if state == TrialState.COMPLETE else None, params={"x": 0.5}, distributions=DIST,
                     user_attrs={"proxy_kv_fraction": kv}, intermediate_values={PROXY_STEP: ppl})
    study.add_trial(t)


def _running_with_proxy(study, kv, ppl):
    trial = study.ask(DIST)
    record_proxy(trial, kv, ppl, 1)
    return trial


def test_rules_read_earlier_trials_proxies_of_any_state():
    study = _study()
    _done(study, 0.3, 1.0, TrialState.PRUNED)  # an earlier trial that was itself pruned still carries its proxy
    p = ProxyFrontPruner(budget=0.5, cap=2.0, margin=0.1, wait_s=0)
    cases = [((0.6, 1.0), "budget"), ((0.3, 2.5), "ppl_cap"), ((0.3, 1.11), "front"), ((0.3, 1.09), None), ((0.29, 1.5), None)]
    for (kv, ppl), rule in cases:
        t = _running_with_proxy(study, kv, ppl)
        frozen = study._storage.get_trial(t._trial_id)
        assert frozen.intermediate_values == {PROXY_STEP: ppl}  # the proxy is the trial's intermediate value 0
        assert p.prune(study, frozen) is (rule is not None)
        assert (p.last[0] if p.last else None) == rule
        study.tell(t, state=TrialState.PRUNED)  # ended (its own proxy is never compared with a later case: all dominated or apart)
    off = ProxyFrontPruner(budget=0.5, cap=None, margin=None)
    t = _running_with_proxy(study, 0.3, 9.0)
    assert not off.prune(study, study._storage.get_trial(t._trial_id))  # the exact setting: nothing pruned under budget
    with pytest.raises(ValueError, match="no proxy recorded"):
        off.prune(study, study._storage.get_trial(study.ask(DIST)._trial_id))
    with pytest.raises(ValueError, match="wait_s must be >= 0"):
        ProxyFrontPruner(budget=0.5, wait_s=-1)


def test_front_rule_waits_for_an_earlier_running_trial_and_only_earlier_ones():
    study = _study()
    first = study.ask(DIST)  # RUNNING, no proxy yet
    later = _running_with_proxy(study, 0.3, 1.5)
    _running_with_proxy(study, 0.2, 1.0)  # a LATER trial that dominates: never read (the decision would depend on timing)
    p = ProxyFrontPruner(budget=0.5, margin=0.1, wait_s=30, poll_s=0.05)
    timer = threading.Timer(0.5, lambda: record_proxy(first, 0.3, 1.0, 1))
    timer.start()
    t0 = time.monotonic()
    assert p.prune(study, study._storage.get_trial(later._trial_id)) and p.last[0] == "front"
    assert "earlier trial 0" in p.last[1] and 0.4 < time.monotonic() - t0 < 30 and not p.timed_out
    impatient = ProxyFrontPruner(budget=0.5, margin=0.1, wait_s=0.2, poll_s=0.05)
    lone = study.ask(DIST)  # RUNNING without a proxy, and it never reports (a killed worker's trial)
    last = _running_with_proxy(study, 0.5, 3.0)
    assert impatient.prune(study, study._storage.get_trial(last._trial_id))  # decided on the proxies present: trial 0 dominates
    assert impatient.timed_out and impatient.waited >= 0.2 and lone.number < last.number


def _pruned(out):
    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(out))
    return {t.number: (t.params, t.user_attrs["pruned_by"], t.intermediate_values) for t in study.trials if t.state == TrialState.PRUNED}


def test_a_two_worker_study_prunes_the_same_trials_as_a_serial_one(tmp_path):
    """The seeded design (enqueued): a bad h2o split right after a good one, run by the other worker at the same time."""
    points = [GOOD, BAD, {"0.h2o.heavy": 0.3, "0.h2o.recent": 0.3}, {"0.h2o.heavy": 0.06, "0.h2o.recent": 0.29}]
    kw = dict(template="h2o", budget=0.9, trials=4, population=4, eval_settings={"windows": 2, "window": 40, "prefix": 20},
              threads=1, outputs=False, enqueue=points, prune_margin=0.1)
    par = tune("tiny-llama", TOK, workers=2, out=tmp_path / "par", **kw)["trials"]
    ser = tune("tiny-llama", TOK, workers=1, out=tmp_path / "ser", **kw)["trials"]
    assert len({t["worker"] for t in par}) == 2  # both workers took trials
    assert [t["params"] for t in par] == [t["params"] for t in ser] == points
    assert [t["state"] for t in par] == [t["state"] for t in ser]
    pp, ps = _pruned(tmp_path / "par"), _pruned(tmp_path / "ser")
    assert pp == ps and 1 in pp  # the same pruned set, the bad split among them
    for number, (_, rule, inter) in pp.items():
        t = next(x for x in par if x["number"] == number)
        assert rule == "front" and t["windows_scored"] == 1 and "ppl" not in t  # pruned after the first of 2 windows
        assert inter == {PROXY_STEP: pytest.approx(t["proxy_ppl_ratio"])}  # recorded in the study with its proxy value
    for t in par:  # every trial that ran a window carries its proxy; completed ones scored both windows
        assert t["proxy_ppl_ratio"] > 0 and (t["state"] != "COMPLETE" or t["windows_scored"] == 2)
