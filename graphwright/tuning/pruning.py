"""Pruning a tuning trial from its first-window proxy, with an Optuna pruner a parallel study runs the same as a serial one.

Technique: successive screening by a cheap proxy before the full evaluation (issue 21: "pruning trials
early from cheap proxies (per-layer sensitivity, short perplexity) before the full evaluation"). After a
trial's first calibration window, its proxy is its KV fraction held and its perplexity ratio to dense on
that window (the short perplexity). The proxy is recorded in the study as the trial's intermediate value at
step ``PROXY_STEP`` (0; the perplexity ratio; the KV fraction is the user attr ``proxy_kv_fraction``), and
``ProxyFrontPruner`` (an ``optuna.pruners.BasePruner``) decides. ``Trial.report``/``Trial.should_prune``
refuse multi-objective studies, so the objective writes the intermediate value through the trial's storage
(what ``report`` does) and calls the study's pruner itself (what ``should_prune`` does).

Rules, first match (``reason``):

- ``budget``: the KV fraction after the first window already exceeds the budget;
- ``ppl_cap``: the proxy perplexity ratio exceeds ``max_ppl_ratio``;
- ``front`` (``margin`` not None): an *earlier* trial (lower number) held no more KV after its first window
  with a first-window perplexity ratio more than a factor ``1 + margin`` lower, i.e. the candidate is
  already worse than the proxy front of the trials before it.

Determinism: the ``front`` rule reads only earlier trials' proxies, and it waits (polling the storage, at most
``wait_s`` seconds) until every earlier trial still WAITING or RUNNING has recorded its proxy or ended. So the
decision is a function of the trials' parameters and their first windows only, not of which worker finished
first: with the seeded, enqueued initial design a run with 2 workers prunes exactly the trials a serial run
prunes (tested). An earlier trial that ended without a proxy (pruned by the sensitivity proxy before any
window, or failed) is not compared. Comparing with pruned earlier trials too changes nothing a completed-only
rule would not also prune eventually (domination with a margin is transitive), but it removes the order
dependence. A wait that reaches ``wait_s`` (a killed worker's trial never reports) decides on the proxies
present and records ``proxy_wait_timed_out``.

Exact setting: ``margin=None`` (the default) with no budget pressure and no cap prunes nothing.
Invariants tested (``tests/tuning/test_proxy_pruner.py``): a pruned trial is PRUNED in the study with its
proxy as intermediate value 0 and ``pruned_by == "front"``, only its first window scored; a serial and a
2-worker run with the same seed prune the same set.
"""

from __future__ import annotations

import time

import optuna

PROXY_STEP = 0
WAIT_S = 1800.0  # a killed worker's RUNNING trial never reports: decide without it after this long


def reason(kv: float, ppl: float, budget: float, cap, margin, earlier: list):
    """``(rule, message)`` when the proxy ``(kv, ppl)`` prunes, else None; ``earlier``: ``[(number, kv, ppl)]`` of earlier trials."""
    if kv > budget:
        return "budget", f"KV fraction {kv:.3f} after the first window exceeds the budget {budget}"
    if cap is not None and ppl > cap:
        return "ppl_cap", f"perplexity ratio {ppl:.3f} after the first window exceeds {cap}"
    if margin is not None:
        for number, ekv, eppl in earlier:
            if ekv <= kv and eppl * (1 + margin) < ppl:
                return "front", (f"first-window perplexity ratio {ppl:.4f} at KV fraction {kv:.3f} is more than {margin:.0%} worse "
                                 f"than earlier trial {number}'s {eppl:.4f} at {ekv:.3f}")
    return None


def record_proxy(trial, kv: float, ppl: float, windows: int) -> None:
    """Store a running trial's proxy: user attrs, then the intermediate value (what the pruner waits for) last."""
    trial.set_user_attr("proxy_kv_fraction", kv)
    trial.set_user_attr("proxy_ppl_ratio", ppl)
    trial.set_user_attr("windows_scored", windows)
    trial.storage.set_trial_intermediate_value(trial._trial_id, PROXY_STEP, float(ppl))


def _proxy(t):
    v = t.intermediate_values.get(PROXY_STEP)
    kv = t.user_attrs.get("proxy_kv_fraction")
    return None if v is None or kv is None else (t.number, float(kv), float(v))


class ProxyFrontPruner(optuna.pruners.BasePruner):
    """The first-window proxy rules (module docstring) as an Optuna pruner; ``last`` holds the latest decision's reason."""

    def __init__(self, budget: float, cap=None, margin=None, wait_s: float = WAIT_S, poll_s: float = 0.2):
        if not (isinstance(wait_s, (int, float)) and wait_s >= 0 and isinstance(poll_s, (int, float)) and poll_s > 0):
            raise ValueError(f"wait_s must be >= 0 and poll_s > 0 (seconds); got wait_s={wait_s!r}, poll_s={poll_s!r}")
        self.budget, self.cap, self.margin, self.wait_s, self.poll_s = budget, cap, margin, float(wait_s), float(poll_s)
        self.last = None
        self.waited, self.timed_out = 0.0, False

    def earlier(self, study, number: int) -> list:
        """Earlier trials' proxies, once every earlier WAITING/RUNNING trial has one (or ``wait_s`` passed)."""
        from optuna.trial import TrialState

        t0 = time.monotonic()
        while True:
            trials = [t for t in study.get_trials(deepcopy=False) if t.number < number]
            pending = [t.number for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING) and _proxy(t) is None]
            self.waited = time.monotonic() - t0
            if not pending or self.waited >= self.wait_s:
                self.timed_out = bool(pending)
                return [p for p in map(_proxy, trials) if p is not None]
            time.sleep(self.poll_s)

    def decide(self, study, trial):
        """``(rule, message)`` or None for the FrozenTrial ``trial`` (its proxy recorded by ``record_proxy``)."""
        p = _proxy(trial)
        if p is None:
            raise ValueError(f"trial {trial.number} has no proxy recorded (record_proxy) at step {PROXY_STEP}")
        _, kv, ppl = p
        self.waited, self.timed_out = 0.0, False
        quick = reason(kv, ppl, self.budget, self.cap, None, [])
        if quick is not None or self.margin is None:
            return quick
        return reason(kv, ppl, self.budget, self.cap, self.margin, self.earlier(study, trial.number))

    def prune(self, study, trial) -> bool:
        self.last = self.decide(study, trial)
        return self.last is not None
