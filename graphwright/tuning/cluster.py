"""``graphwright tune --scheduler tcp://HOST:PORT``: trials as tasks on a Dask ``distributed`` cluster.

Engine: Dask ``distributed`` (optional extra ``graphwright[cluster]``), not Ray: dask and distributed
are pure-Python wheels (about 1.5 MB and 1.0 MB, plus small dependencies such as tornado,
msgpack, cloudpickle), where Ray is a ~80 MB platform wheel with its own compiled runtime; a
Dask cluster is ``dask scheduler`` on one host and ``dask worker tcp://HOST:PORT`` on the others,
and ``distributed.LocalCluster`` runs the same scheduler in-process for tests.

One task per trial: ``tune`` (the parent) makes sure the study holds one WAITING trial per trial
still to run (the seeded initial design and ``enqueue`` points are already WAITING; empty ones,
whose parameters the worker's NSGA-II sampler draws, are added) and submits ``run_trial(number)``
for each. A task claims its own trial by number (WAITING -> RUNNING, atomic in Optuna's
storages), runs the objective on the worker's cached evaluator (the model is loaded and the
graph captured once per worker process) and tells the result to the study. The study lives in
storage every worker reaches: a database URL (``--storage sqlite:///...`` on a shared disk,
``postgresql://...``) or an Optuna journal file on a shared filesystem.

Lost work: when a worker dies, the scheduler reruns its task on another worker; the rerun finds
its trial RUNNING (only an attempt of the same task can have claimed it), marks it FAIL with user
attr ``lost``, enqueues its parameters again (``retry_of``) and runs that retry itself. A task the
scheduler gives up on (``KilledWorker``, past ``distributed.scheduler.allowed-failures``) ends
the round with its trial still RUNNING; ``tune`` recovers it between rounds (``recover_lost``) and
the next round runs it, as for local workers. So every trial slot ends exactly once (tested with a
worker killed mid-trial on a ``LocalCluster``). A scheduler that wrongly declares a live worker
dead can make the first attempt run on beside its rerun: the first then cannot record a result
(its trial is already FAIL) and the retry is the one counted.
"""

from __future__ import annotations

import os
import threading

CLUSTER_EXTRA = "graphwright[cluster]"
_CACHE: dict = {}  # per worker process: (model, storage, settings) -> (Evaluator, settings, space, base)
_LOCK = threading.Lock()  # one trial at a time per process (a worker with several threads queues them)


def need_distributed():
    """``distributed``, or an error naming the extra that installs it."""
    from ..errors import GraphwrightError

    try:
        import distributed
    except ImportError as e:
        raise GraphwrightError(f"--scheduler / tune(scheduler=...) runs trials on a Dask cluster and needs the `distributed` package: "
                          f"pip install '{CLUSTER_EXTRA}' (local workers, the default, need nothing extra)") from e
    return distributed


def _context(model, tokenizer, spec: str, threads):
    import json

    import optuna

    from .objectives import Evaluator, set_threads
    from .study import STUDY_NAME, _load_model, open_storage, study_space

    set_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(spec), sampler=None)
    storage = study._storage  # the study's own (an RDBStorage comes wrapped in Optuna's per-process cache): trials claimed here are known to it
    settings = study.user_attrs["settings"]
    key = (model if isinstance(model, str) else id(model), spec, json.dumps(settings, sort_keys=True, default=str))
    if key not in _CACHE:
        loaded, tok = _load_model(model, tokenizer)
        ev = Evaluator(loaded, tok, split="calibration", backend=settings["backend"], seed=settings["seed"], **settings["eval"])
        _CACHE.clear()  # one study per worker process at a time: drop another study's model
        _CACHE[key] = ev
    return study, storage, settings, study_space(study), _CACHE[key]


def _claim(study, storage, number: int):
    """The trial id this task runs: trial ``number`` (WAITING -> RUNNING), or, when an earlier attempt of this task
    left it RUNNING (its worker died), a retry of it. None when that attempt already finished it."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from .study import lose_trial

    # read every trial first: RDBStorage's per-process cache then knows the trial ids (as Study.ask's own pop does)
    by_number = {t.number: t._trial_id for t in storage.get_all_trials(study._study_id, deepcopy=False)}
    tid = by_number[number]
    try:
        if storage.set_trial_state_values(tid, TrialState.RUNNING):
            return tid
    except UpdateFinishedTrialError:
        return None
    retry = lose_trial(study, storage, storage.get_trial(tid))
    storage.set_trial_state_values(retry, TrialState.RUNNING)
    return retry


def run_trial(model, tokenizer, spec: str, number: int, threads=None) -> dict:
    """One Dask task: run trial ``number`` of the study in ``spec`` (or its retry); returns its number and state."""
    import optuna
    from optuna.trial import TrialState

    from ..errors import RecipeError
    from .study import _objective, _sampler

    with _LOCK:
        study, storage, settings, space, ev = _context(model, tokenizer, spec, threads)
        tid = _claim(study, storage, number)
        if tid is None:
            t = next(x for x in study.get_trials(deepcopy=False) if x.number == number)
            return {"number": number, "state": t.state.name, "ran": False}
        study.sampler = _sampler(settings, number)
        try:
            import distributed

            where = distributed.get_worker().address
        except (ImportError, ValueError):  # not inside a Dask worker (called directly)
            where = f"pid {os.getpid()}"
        objective = _objective(settings, space, ev, study.user_attrs["base"], where)
        trial = optuna.Trial(study, tid)
        try:
            values = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except RecipeError:  # a recipe the pass refuses: the trial fails, the study goes on (as optimize's catch=)
            study.tell(trial, state=TrialState.FAIL)
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            study.tell(trial, values)
        return {"number": trial.number, "state": storage.get_trial(tid).state.name, "ran": True}


def run_round(scheduler: str, model, tokenizer, spec: str, study, remaining: int, threads) -> None:
    """Submit one task per trial still to run (adding empty WAITING trials as needed) and wait for all of them.

    A task that failed on a worker death past the scheduler's retries (``KilledWorker``) leaves its trial
    RUNNING for ``recover_lost``; any other task error is raised once every task has ended."""
    from optuna.trial import TrialState

    from ..errors import GraphwrightError

    distributed = need_distributed()
    waiting = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    for _ in range(remaining - len(waiting)):
        study.enqueue_trial({})
    numbers = sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))[:remaining]
    with distributed.Client(scheduler, set_as_default=False) as client:
        futures = [client.submit(run_trial, model, tokenizer, spec, n, threads, pure=False, key=f"graphwright-tune-trial-{n}-{os.urandom(4).hex()}")
                   for n in numbers]
        client.gather(futures, errors="skip")  # waits for every task; their errors are read below
        errors = []
        for n, f in zip(numbers, futures):
            if f.status == "error":
                exc = f.exception()
                if not isinstance(exc, distributed.KilledWorker):
                    errors.append(f"trial {n}: {type(exc).__name__}: {exc}")
    if errors:
        raise GraphwrightError("tune: cluster task(s) failed: " + "; ".join(errors) +
                               "; the study keeps every finished trial (--resume continues)")
