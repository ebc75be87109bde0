"""``graphwright.tune``: a multi-objective Optuna study over the tunable settings of a recipe template.

Technique: NSGA-II (Deb et al. 2002, doi:10.1109/4235.996017) via ``optuna.samplers.NSGAIISampler``
with a constraint (KV bytes held <= budget x dense, as ``kv_fraction - budget <= 0``), minimising
(KV fraction held, perplexity ratio to dense) on the calibration split, plus maximising needle
accuracy when ``niah_cases > 0`` and decode speed (tokens/s ratio to dense, ``objectives``
holding ``"speed"``). No home-made optimiser.

- Speed floor: ``min_speed=X`` is a second constraint, ``X - speed_ratio <= 0``, set with
  ``trial.set_constraint`` (NSGA-II's constrained domination: an infeasible trial never dominates
  a feasible one; the Pareto front keeps feasible trials only). The ratio is measured in the
  trial's own worker, alternating dense and candidate decode (``objectives.Evaluator.speed_ratio``).
  Timings on a shared machine are noisy: a floor near 1.0 can flip on load alone.
- Perplexity-aware quality: ``max_ppl_delta=x`` is a constraint ``ppl_ratio - (1 + x) <= 0`` on the trial's
  full calibration perplexity (every window, not the first-window proxy that ``max_ppl_ratio`` prunes on): a
  trial more than ``100 x``% above dense is infeasible, NSGA-II never prefers it, and the front (so the winner)
  holds none. With needles measured (``niah_cases > 0``) and ``winner="niah"`` the winner is then the most
  calibration needles among recipes within x% of dense perplexity: quality = needle proxy AND perplexity delta
  <= x. Unlike ``winner="niah+ppl"`` (a cap applied to the finished front) the search itself sees it.
  ``None`` (default): off.

- Search space: ``tune.space.search_space`` (from the passes' ``Arg(tune=...)`` declarations).
- Cost of a trial: the step graph is captured once per worker (``objectives.Evaluator``) and the
  dense scores once per study (stored in the study, read by every worker); a trial is its own
  rewrite plus its evaluation. After the first calibration window the trial's proxy (KV fraction, first-window
  perplexity ratio) is recorded in the study as its intermediate value 0 and judged by an Optuna pruner
  (``pruning.ProxyFrontPruner``): pruned (``TrialPruned``, user attr ``pruned_by``) when its KV fraction
  already exceeds the budget (``budget``), its perplexity ratio exceeds ``max_ppl_ratio`` (``ppl_cap``), or
  (``front``, ``prune_margin=m``) an earlier trial held no more KV after its first window with a first-window
  perplexity ratio more than a factor (1 + m) lower: the candidate is already worse than the proxy front, so its
  remaining windows, needles and speed are not measured. The front rule waits for the earlier trials' proxies,
  so a parallel study prunes what a serial one prunes (tested). ``pareto.json`` records how many trials each
  rule pruned.
- Sensitivity proxy (``max_predicted_ppl=X``, ``tuning.sensitivity``): measured once per study on the
  base model (each layer alone at the low end of its ranges, first window), stored with the dense
  scores; a trial whose predicted perplexity ratio exceeds X is pruned (rule ``sensitivity``) before
  its rewrite and any window. Needs every parameter per layer (``scope="layer"``).
- Scope: ``scope="layer"`` tunes eviction budgets, ``lowrank_kv`` keeps and ``streaming`` windows per
  layer, ``scope="head"`` duo's retrieval choice per (layer, KV head) (``space.search_space``); the TOML
  of each Pareto point round-trips through ``compile()`` (tested).
- Storage: an Optuna journal file (``JournalFileBackend``) in ``out`` by default, or ``storage=``: a
  database URL (``RDBStorage``) or a journal file path (``open_storage``); ``resume=True`` continues it.
- Cluster: ``scheduler="tcp://HOST:PORT"`` runs each trial as a task on a Dask ``distributed`` cluster
  (``tuning.cluster``, extra ``graphwright[cluster]``); the study must then be in storage every worker reaches.
- Workers: ``workers`` local processes (spawned), each running ``study.optimize`` on the shared
  journal with ``trials`` split exactly between them. A killed worker breaks the round; its RUNNING
  trial is marked FAIL (``lost``) and its params enqueued again (``retry_of``), and another round
  runs the trials still missing (at most ``MAX_ROUNDS``); ``resume`` does the same for a killed run. The first ``population`` trials (the initial
  design) are drawn in the parent from a seeded ``RandomSampler`` and enqueued, so each runs once,
  in whichever worker takes it, and a parallel run's initial design equals a serial run's with the
  same seed (tested). Later NSGA-II generations depend on which trials have finished when a worker
  asks, so beyond the initial design a parallel run is not identical to a serial one.
- Outputs (``report.write_outputs``): pareto.json / pareto.md / pareto.png, one TOML recipe per
  Pareto point, and the winner (the feasible Pareto point with the lowest perplexity ratio)
  re-measured on the held-out split with its ``cm.report()``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
from pathlib import Path

from ..errors import GraphwrightError, RecipeError
from .objectives import Evaluator, set_threads
from .space import distributions, recipe_for, search_space

STUDY_NAME = "graphwright-tune"
JOURNAL = "study.journal"
MAX_ROUNDS = 3  # rounds of workers: a round a killed worker ended is followed by one that reruns its trials
DEFAULT_EVAL = {"windows": 2, "window": 256, "prefix": 128, "niah_cases": 0, "niah_length": 256}


def _storage(out: Path):
    """The default study storage: the journal file in ``out``."""
    return open_storage(str(Path(out) / JOURNAL))


def open_storage(spec: str):
    """Optuna storage from a spec: a database URL (``sqlite:///...``, ``postgresql://...``: ``RDBStorage``) or the
    path of an Optuna journal file (``JournalFileBackend``; on a filesystem every worker mounts, for a cluster)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"storage must be a database URL (e.g. sqlite:///study.db) or a journal file path; got {spec!r}")
    if "://" in spec:
        return RDBStorage(spec)
    return JournalStorage(JournalFileBackend(spec))


def _load_model(model, tokenizer):
    if hasattr(model, "forward"):
        return model, tokenizer
    from ..models import load_model

    m, tok = load_model(model)
    tok = tokenizer if tokenizer is not None else tok
    if tok is None:  # the built-in tiny models ship no tokenizer: bytes stand in
        from ..eval.bytetok import ByteTokenizer

        tok = ByteTokenizer()
    return m, tok


OBJECTIVES = ("kv", "ppl", "speed")


def _directions(settings):
    return (["minimize", "minimize"] + (["maximize"] if settings["eval"]["niah_cases"] else [])
            + (["maximize"] if "speed" in settings.get("objectives", ()) else []))


def _speed_on(settings) -> bool:
    return "speed" in settings.get("objectives", ()) or settings.get("min_speed") is not None


def make_pruner(settings):
    """The study's ``pruning.ProxyFrontPruner`` from its settings (budget, ``max_ppl_ratio``, ``prune_margin``, ``prune_wait_s``)."""
    from .pruning import WAIT_S, ProxyFrontPruner

    return ProxyFrontPruner(settings["budget"], settings["max_ppl_ratio"], settings.get("prune_margin"),
                            wait_s=settings.get("prune_wait_s", WAIT_S))


def _sampler(settings, offset: int):
    import optuna

    return optuna.samplers.NSGAIISampler(population_size=settings["population"], seed=settings["seed"] + offset)


def _objective(settings, space, ev, base, worker: int = 0, measure=None):
    import optuna

    budget = settings["budget"]
    speed = settings.get("speed") if _speed_on(settings) else None
    pruner = make_pruner(settings)

    def objective(trial):
        values = {}
        for p in space:
            if p.kind == "int":
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            elif p.kind == "float":
                values[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), log=p.log)
            else:
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        recipe = recipe_for(settings["template"], space, values)
        trial.set_user_attr("recipe", str(recipe))
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("pid", os.getpid())  # the process that ran it: a lost trial names its worker
        cap = settings.get("max_predicted_ppl")
        if cap is not None:  # the per-layer sensitivity proxy: before any rewrite or window (tuning/sensitivity.py)
            from .sensitivity import RULE, predicted_ppl_ratio

            predicted = predicted_ppl_ratio(base["sensitivity"], space, values)
            trial.set_user_attr("predicted_ppl_ratio", predicted)
            if predicted > cap:
                trial.set_user_attr("pruned_by", RULE)
                raise optuna.TrialPruned(f"the per-layer sensitivity predicts a perplexity ratio {predicted:.4f} > {cap}")

        def proxy_check(partial):  # the short-perplexity proxy: recorded as intermediate value 0, judged by the pruner
            from .pruning import record_proxy

            record_proxy(trial, partial["kv_fraction"], partial["ppl_ratio"], partial["windows"])
            prune = pruner.prune(trial.study, trial.storage.get_trial(trial._trial_id))
            if pruner.waited > 0:
                trial.set_user_attr("proxy_wait_s", round(pruner.waited, 3))
            if pruner.timed_out:
                trial.set_user_attr("proxy_wait_timed_out", True)
            if prune:
                trial.set_user_attr("pruned_by", pruner.last[0])
                raise optuna.TrialPruned(pruner.last[1])

        m = ev.evaluate(recipe, base=base, proxy_check=proxy_check, speed=speed, measure=measure)
        trial.set_user_attr("windows_scored", m["windows"])
        for k in ("kv_bytes", "kv_fraction", "ppl", "ppl_ratio", "niah", "tokens_per_s", "speed_ratio"):
            trial.set_user_attr(k, m[k])
        trial.set_constraint("kv_budget", m["kv_fraction"] - budget)  # feasible when <= 0 (NSGA-II's constrained domination)
        if settings.get("min_speed") is not None:
            trial.set_constraint("speed_floor", settings["min_speed"] - m["speed_ratio"])
        if settings.get("max_ppl_delta") is not None:  # perplexity within x of dense on every calibration window
            trial.set_constraint("ppl_delta", m["ppl_ratio"] - (1.0 + settings["max_ppl_delta"]))
        out = [m["kv_fraction"], m["ppl_ratio"]]
        return (out + ([m["niah"]] if settings["eval"]["niah_cases"] else [])
                + ([m["speed_ratio"]] if "speed" in settings.get("objectives", ()) else []))

    return objective


def study_space(study) -> list:
    """The study's ``Param`` list as stored when it was created (workers read it, never rebuild it)."""
    from .space import Param

    return [Param.from_dict(d) for d in study.user_attrs["space"]]


def run_worker(model, tokenizer, storage: str, n_trials: int, offset: int, threads: int | None = None, measure=None) -> int:
    """One worker: load the model and the study (``storage``: an ``open_storage`` spec), capture once, run ``n_trials`` trials."""
    import optuna

    set_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=None)
    settings = study.user_attrs["settings"]
    study.sampler = _sampler(settings, offset)
    model, tokenizer = _load_model(model, tokenizer)
    ev = Evaluator(model, tokenizer, split="calibration", backend=settings["backend"], seed=settings["seed"], **settings["eval"])
    space = study_space(study)
    study.optimize(_objective(settings, space, ev, study.user_attrs["base"], offset, measure), n_trials=n_trials, catch=(RecipeError,))
    return n_trials


def _worker_entry(args):
    return run_worker(*args)


def _run_pool(model, tokenizer, spec: str, trials: int, workers: int, offset: int, threads) -> None:
    """``trials`` split exactly over ``workers`` spawned processes, one process per share; a killed worker ends only
    itself (its RUNNING trial is recovered by ``recover_lost`` and rerun in the next round).

    Plain processes rather than a ``ProcessPoolExecutor``: a pool worker killed while it holds the pool's shared
    call-queue lock leaves the surviving workers blocked on that lock forever (seen in CI), and a process that
    only reads its own arguments has no such lock. A worker that fails (exit code > 0; its traceback is on
    stderr) is an error here; one killed by a signal (exit code < 0) is not."""
    ctx = mp.get_context("spawn")
    shares = [trials // workers + (i < trials % workers) for i in range(workers)]
    procs = [ctx.Process(target=_worker_entry, args=((model, tokenizer, spec, n, offset + 1 + i, threads),))
             for i, n in enumerate(shares) if n]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [(i, proc.exitcode) for i, proc in enumerate(procs) if proc.exitcode and proc.exitcode > 0]
    if failed:
        raise GraphwrightError(f"tune: worker(s) {', '.join(f'{i} (exit code {c})' for i, c in failed)} failed; "
                               "their tracebacks are above; the study in --out keeps every finished trial (--resume continues)")


def _finished(study) -> int:
    """Trials that ran to an end (complete, pruned, or failed on a bad recipe); lost ones (killed workers) excluded."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if not t.user_attrs.get("lost"))


def recover_lost(study, storage) -> list:
    """Trials left RUNNING by a killed worker: mark them FAIL (user attr ``lost``) and enqueue their params again.

    Returns the lost trial numbers. The retry carries ``retry_of`` = the lost trial's number. Only call it
    when no worker is running on the study (between rounds, or at ``resume``).
    """
    from optuna.trial import TrialState

    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lose_trial(study, storage, t)
        lost.append(t.number)
    return lost


def lose_trial(study, storage, t) -> int:
    """Mark RUNNING trial ``t`` lost (FAIL, user attr ``lost``) and enqueue its params again (``retry_of``); the retry's trial id."""
    import optuna
    from optuna.trial import TrialState

    storage.set_trial_user_attr(t._trial_id, "lost", True)
    storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    retry = optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={"fixed_params": dict(t.params)},
                                      user_attrs={"retry_of": t.number})
    return storage.create_new_trial(study._study_id, template_trial=retry)


def _check_args(model, trials, workers, budget, objectives, min_speed, prune_margin, measure, eval_settings,
                max_predicted_ppl=None, prune_wait_s=1800.0, max_ppl_delta=None) -> None:
    """ValueError naming the first bad argument of ``tune`` and what is allowed."""
    if not (isinstance(trials, int) and trials >= 1) or not (isinstance(workers, int) and 1 <= workers <= 64):
        raise ValueError(f"trials must be an int >= 1 and workers an int in [1, 64]; got trials={trials!r}, workers={workers!r}")
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"budget is the KV fraction held, in (0, 1]; got {budget!r}")
    if workers > 1 and hasattr(model, "forward"):
        raise ValueError("workers > 1 loads the model in each worker: pass its name or path, not a loaded model")
    if not ({"kv", "ppl"} <= set(tuple(objectives)) <= set(OBJECTIVES)) or len(set(tuple(objectives))) != len(tuple(objectives)):
        raise ValueError(f"objectives must hold 'kv' and 'ppl' and may add 'speed' (each once); got {list(objectives)}")
    if min_speed is not None and not (isinstance(min_speed, (int, float)) and min_speed > 0):
        raise ValueError(f"min_speed is a decode tokens/s ratio to dense, > 0; got {min_speed!r}")
    if prune_margin is not None and not (isinstance(prune_margin, (int, float)) and prune_margin >= 0):
        raise ValueError(f"prune_margin is a fraction >= 0 (or None: off); got {prune_margin!r}")
    if not (isinstance(prune_wait_s, (int, float)) and prune_wait_s >= 0):
        raise ValueError(f"prune_wait_s is how long (seconds, >= 0) the front rule waits for earlier trials' proxies; got {prune_wait_s!r}")
    if max_predicted_ppl is not None and not (isinstance(max_predicted_ppl, (int, float)) and max_predicted_ppl >= 1):
        raise ValueError(f"max_predicted_ppl is a perplexity ratio to dense, >= 1 (or None: off); got {max_predicted_ppl!r}")
    if max_ppl_delta is not None and (isinstance(max_ppl_delta, bool) or not isinstance(max_ppl_delta, (int, float))
                                      or not 0 <= max_ppl_delta < float("inf")):
        raise ValueError(f"max_ppl_delta is the largest perplexity increase over dense allowed, a finite fraction >= 0 "
                         f"(0.05 = at most 5% above dense; None: off); got {max_ppl_delta!r}")
    if measure is not None and workers > 1:
        raise ValueError("measure= runs in this process only: use workers=1 with a custom speed measure")
    bad = sorted(set(eval_settings or {}) - set(DEFAULT_EVAL))
    if bad:
        raise ValueError(f"unknown eval setting {bad[0]!r}; allowed: {', '.join(DEFAULT_EVAL)}")


def _check_cluster_args(model, workers, measure, scheduler, storage) -> None:
    """Errors for ``scheduler=``/``storage=`` that cannot work, naming what is allowed."""
    if storage is not None and not (isinstance(storage, str) and storage):
        raise ValueError(f"storage must be a database URL (e.g. sqlite:///study.db) or a journal file path; got {storage!r}")
    if scheduler is None:
        return
    if not (isinstance(scheduler, str) and "://" in scheduler):
        raise ValueError(f"scheduler is a Dask scheduler address like tcp://HOST:8786; got {scheduler!r}")
    if hasattr(model, "forward"):
        raise ValueError("scheduler= loads the model on each cluster worker: pass its name or path, not a loaded model")
    if workers != 1:
        raise ValueError(f"with scheduler= the cluster's workers run the trials (one task per trial): leave workers at 1; got {workers}")
    if measure is not None:
        raise ValueError("measure= runs in this process only: it cannot be used with scheduler=")
    from .cluster import need_distributed

    need_distributed()


def _create(storage, settings, loaded, tok, trials: int, enqueue):
    """A new study: its settings, space, dense scores, then ``enqueue`` and the seeded initial design (enqueued)."""
    import optuna

    space = search_space(settings["template"], settings["eval"]["prefix"], settings["scope"], _num_layers(loaded),
                         _num_kv_heads(loaded))  # errors before any work
    if settings.get("max_predicted_ppl") is not None:
        from .sensitivity import check_space

        check_space(space)
    names = {p.name for p in space}
    for i, point in enumerate(enqueue or []):
        unknown = sorted(set(point) - names)
        if unknown:
            raise ValueError(f"enqueue[{i}] names {unknown[0]!r}, not a parameter of this space; parameters: {', '.join(sorted(names))}")
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=_directions(settings))
    study.set_user_attr("settings", settings)
    study.set_user_attr("space", [p.to_dict() for p in space])
    ev = Evaluator(loaded, tok, split="calibration", backend=settings["backend"], seed=settings["seed"], **settings["eval"])
    base = ev.base()
    if settings.get("max_predicted_ppl") is not None:  # measured once per study, stored with the dense scores
        from .sensitivity import measure

        base["sensitivity"] = measure(ev, base, settings["template"], space)
    study.set_user_attr("base", base)
    # the initial design: drawn here from a seeded RandomSampler, enqueued so each point runs exactly once
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=settings["seed"]), directions=_directions(settings))
    dists = distributions(space)
    for point in enqueue or []:
        study.enqueue_trial(dict(point))
    for _ in range(min(max(trials - len(enqueue or []), 0), settings["population"])):
        study.enqueue_trial(draw.ask(dists).params)
    return study


def tune(model, tokenizer=None, template: str = "snapkv", budget: float = 0.5, trials: int = 8, workers: int = 1,
         out=None, seed: int = 0, resume: bool = False, population: int = 8, max_ppl_ratio: float | None = None,
         eval_settings: dict | None = None, backend: str = "torch", threads: int | None = None, outputs: bool = True,
         scope="model", objectives=("kv", "ppl"), min_speed: float | None = None, speed_steps: int = 16, speed_rounds: int = 3,
         prune_margin: float | None = None, enqueue: list | None = None, measure=None, scheduler: str | None = None,
         storage: str | None = None, max_predicted_ppl: float | None = None, winner: str = "ppl",
         prune_wait_s: float = 1800.0, winner_ppl_cap: float | None = None, max_ppl_delta: float | None = None) -> dict:
    """Search the tunable settings of ``template`` on ``model``; returns the result (and writes ``out``).

    ``budget``: the largest KV fraction (bytes held / dense) a feasible recipe may hold.
    ``trials``: trials run by this call (split exactly over ``workers`` local processes; ``workers > 1``
    needs ``model`` as a name or path each worker can load). ``eval_settings``: ``windows``,
    ``window``, ``prefix`` (streamed perplexity) and ``niah_cases``, ``niah_length`` (needles), on
    the calibration split; the winner is re-measured on the held-out split with the same sizes.
    ``resume``: continue the study in ``out`` (its settings are kept; ``template`` etc. must match).
    ``scope``: "model", "layer", "head" or ``{pass: scope}`` (``space.search_space``). ``max_predicted_ppl``:
    prune, before it runs, a trial the per-layer sensitivity proxy predicts above this perplexity ratio
    (``tuning.sensitivity``; measured once per study; needs every parameter per layer; None, the default: off). ``objectives``: "kv" and
    "ppl", plus "speed" (decode tokens/s ratio to dense, maximised). ``min_speed``: the speed floor
    (a constraint). ``speed_steps``/``speed_rounds``: decode steps per measure and alternating rounds.
    ``prune_margin``: prune a trial whose first-window perplexity ratio is more than this fraction
    worse than an earlier trial's at no more KV (None, the default: off; ``pruning.ProxyFrontPruner``, which
    waits up to ``prune_wait_s`` seconds for earlier trials' proxies, so parallel runs prune as serial ones). ``enqueue``: ``[{param name: value}]``
    run first (e.g. hand-written settings). ``measure``: ``(cm, ids, steps) -> tokens/s`` replacing
    the timed decode (workers=1 only; tests).
    ``scheduler``: a Dask scheduler address (``tcp://HOST:PORT``): each trial runs as a task on that cluster
    (``tuning.cluster``; needs the ``graphwright[cluster]`` extra and ``model`` as a name or path every worker
    loads); None (default): ``workers`` local processes. ``storage``: where the study lives, a database URL
    (``sqlite:///...``, ``postgresql://...``) or an Optuna journal file path, which every worker must reach;
    None (default): ``out/study.journal``. ``winner``: which Pareto point is re-measured on the held-out split,
    "ppl" (lowest perplexity ratio, the default), "niah" (most calibration needles, then lowest perplexity
    ratio; needs ``niah_cases > 0``) or "niah+ppl" (most needles among the points with a perplexity ratio <=
    ``winner_ppl_cap``, default ``report.WINNER_PPL_CAP`` = 1.05, else the lowest perplexity ratio; needs
    ``niah_cases > 0``); ``report.pick_winner``. ``max_ppl_delta``: the largest calibration perplexity increase over
    dense a feasible trial may have (a fraction: 0.05 = 5%; a constraint ``ppl_ratio <= 1 + x`` the search and the
    front respect; None, the default: off). On resume the study's own setting is kept.
    """
    import optuna

    _check_args(model, trials, workers, budget, objectives, min_speed, prune_margin, measure, eval_settings, max_predicted_ppl,
                prune_wait_s, max_ppl_delta)
    _check_cluster_args(model, workers, measure, scheduler, storage)
    from .report import WINNER_RULES, check_ppl_cap

    if winner not in WINNER_RULES:
        raise ValueError(f"winner must be one of {list(WINNER_RULES)}; got {winner!r}")
    if winner in ("niah", "niah+ppl") and not {**DEFAULT_EVAL, **(eval_settings or {})}["niah_cases"]:
        raise ValueError(f"winner={winner!r} picks by calibration needle accuracy: set eval_settings niah_cases > 0 (--niah-cases)")
    if winner_ppl_cap is not None:
        if winner != "niah+ppl":
            raise ValueError(f"winner_ppl_cap applies to winner='niah+ppl' only; got winner={winner!r}")
        winner_ppl_cap = check_ppl_cap(winner_ppl_cap)
    objectives = tuple(objectives)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="graphwright-tune-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = storage if storage is not None else str(out / JOURNAL)
    storage = open_storage(spec)
    where = out if spec == str(out / JOURNAL) else spec
    exists = STUDY_NAME in optuna.get_all_study_names(storage)
    if exists and not resume:
        raise ValueError(f"{where} already holds a study: pass resume=True (--resume) to continue it, or a fresh out folder")
    if resume and not exists:
        raise ValueError(f"no study to resume in {where}")
    loaded, tok = _load_model(model, tokenizer)
    if resume:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        settings = study.user_attrs["settings"]
        if settings["template"] != template:
            raise ValueError(f"the study in {out} tunes {settings['template']!r}, not {template!r}")
    else:
        settings = {"template": template, "budget": float(budget), "seed": seed, "population": population, "max_ppl_ratio": max_ppl_ratio,
                    "backend": backend, "eval": {**DEFAULT_EVAL, **(eval_settings or {})}, "scope": scope,
                    "objectives": list(objectives), "min_speed": min_speed, "prune_margin": prune_margin,
                    "max_predicted_ppl": max_predicted_ppl, "winner": winner, "winner_ppl_cap": winner_ppl_cap,
                    "prune_wait_s": float(prune_wait_s), "max_ppl_delta": None if max_ppl_delta is None else float(max_ppl_delta),
                    "speed": {"steps": speed_steps, "rounds": speed_rounds}}
        study = _create(storage, settings, loaded, tok, trials, enqueue)
    if resume:
        recover_lost(study, storage)  # trials a killed run left RUNNING (resume assumes no other process runs this study)
    target = _finished(study) + trials
    for _ in range(MAX_ROUNDS):
        remaining = target - _finished(study)
        if remaining <= 0:
            break
        offset = len(study.trials)
        if scheduler is not None:
            from .cluster import run_round

            run_round(scheduler, model, tokenizer, spec, study, remaining, threads)
        elif workers == 1:
            run_worker(loaded, tok, spec, remaining, offset, threads, measure)
        else:
            _run_pool(model, tokenizer, spec, remaining, workers, offset, threads)
        recover_lost(study, storage)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    result = {"out": str(out), "settings": settings, "base": study.user_attrs["base"], "trials": trial_rows(study)}
    if outputs:
        from .report import write_outputs

        result.update(write_outputs(result, loaded, tok))
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _num_layers(model) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return int(n) if n is not None else None


def _num_kv_heads(model) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    return int(n) if n is not None else None


def trial_rows(study) -> list:
    """Every trial as plain data: number, state, params, recipe and measured values."""
    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params), **{k: v for k, v in t.user_attrs.items()},
                     "values": list(t.values) if t.values is not None else None})
    return rows
