"""``graphwright.tune``: a multi-objective Optuna study over the tunable settings of a recipe template.

Technique: NSGA-II (Deb et al. 2002, doi:10.1109/4235.996017) via ``optuna.samplers.NSGAIISampler``
with a constraint (KV bytes held <= budget x dense, as ``kv_fraction - budget <= 0``), minimising
(KV fraction held, perplexity ratio to dense) on the calibration split, plus maximising needle
accuracy when ``niah_cases > 0``. No home-made optimiser.

- Search space: ``tune.space.search_space`` (from the passes' ``Arg(tune=...)`` declarations).
- Cost of a trial: the step graph is captured once per worker (``objectives.Evaluator``) and the
  dense scores once per study (stored in the study, read by every worker); a trial is its own
  rewrite plus its evaluation. After the first calibration window a cheap proxy prunes the trial
  (``TrialPruned``) when its KV fraction already exceeds the budget or its perplexity ratio exceeds
  ``max_ppl_ratio``.
- Storage: an Optuna journal file (``JournalFileBackend``) in ``out``; ``resume=True`` continues it.
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
import tempfile
from pathlib import Path

from ..errors import RecipeError
from .objectives import Evaluator, set_threads
from .space import distributions, recipe_for, search_space

STUDY_NAME = "graphwright-tune"
JOURNAL = "study.journal"
MAX_ROUNDS = 3  # rounds of workers: a round a killed worker ended is followed by one that reruns its trials
DEFAULT_EVAL = {"windows": 2, "window": 256, "prefix": 128, "niah_cases": 0, "niah_length": 256}


def _storage(out: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(out / JOURNAL)))


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


def _directions(settings):
    return ["minimize", "minimize"] + (["maximize"] if settings["eval"]["niah_cases"] else [])


def _sampler(settings, offset: int):
    import optuna

    return optuna.samplers.NSGAIISampler(population_size=settings["population"], seed=settings["seed"] + offset)


def _objective(settings, space, ev, base, worker: int = 0):
    import optuna

    budget, cap = settings["budget"], settings["max_ppl_ratio"]

    def proxy_check(partial):
        if partial["kv_fraction"] > budget:
            raise optuna.TrialPruned(f"KV fraction {partial['kv_fraction']:.3f} after the first window exceeds the budget {budget}")
        if cap is not None and partial["ppl_ratio"] > cap:
            raise optuna.TrialPruned(f"perplexity ratio {partial['ppl_ratio']:.3f} after the first window exceeds {cap}")

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
        m = ev.evaluate(recipe, base=base, proxy_check=proxy_check)
        for k in ("kv_bytes", "kv_fraction", "ppl", "ppl_ratio", "niah", "tokens_per_s"):
            trial.set_user_attr(k, m[k])
        trial.set_constraint("kv_budget", m["kv_fraction"] - budget)  # feasible when <= 0 (NSGA-II's constrained domination)
        out = [m["kv_fraction"], m["ppl_ratio"]]
        return out + ([m["niah"]] if settings["eval"]["niah_cases"] else [])

    return objective


def run_worker(model, tokenizer, out: str, n_trials: int, offset: int, threads: int | None = None) -> int:
    """One worker: load the model and the study, capture once, run ``n_trials`` trials. Returns how many it ran."""
    import optuna

    set_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out)
    storage = _storage(out)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=None)
    settings = study.user_attrs["settings"]
    study.sampler = _sampler(settings, offset)
    model, tokenizer = _load_model(model, tokenizer)
    ev = Evaluator(model, tokenizer, split="calibration", backend=settings["backend"], seed=settings["seed"], **settings["eval"])
    space = search_space(settings["template"], settings["eval"]["prefix"])
    study.optimize(_objective(settings, space, ev, study.user_attrs["base"], offset), n_trials=n_trials, catch=(RecipeError,))
    return n_trials


def _worker_entry(args):
    return run_worker(*args)


def _run_pool(model, tokenizer, out: Path, trials: int, workers: int, offset: int, threads) -> None:
    """``trials`` split exactly over ``workers`` spawned processes; a killed worker ends the round (its trial is recovered)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    shares = [trials // workers + (i < trials % workers) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_worker_entry, (model, tokenizer, str(out), n, offset + 1 + i, threads)) for i, n in enumerate(shares) if n]
        for f in futures:
            try:
                f.result()
            except BrokenProcessPool:  # a worker died: the pool stops the others; the next round reruns what is missing
                pass


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
        storage.set_trial_user_attr(t._trial_id, "lost", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        lost.append(t.number)
    return lost


def tune(model, tokenizer=None, template: str = "snapkv", budget: float = 0.5, trials: int = 8, workers: int = 1,
         out=None, seed: int = 0, resume: bool = False, population: int = 8, max_ppl_ratio: float | None = None,
         eval_settings: dict | None = None, backend: str = "torch", threads: int | None = None, outputs: bool = True) -> dict:
    """Search the tunable settings of ``template`` on ``model``; returns the result (and writes ``out``).

    ``budget``: the largest KV fraction (bytes held / dense) a feasible recipe may hold.
    ``trials``: trials run by this call (split exactly over ``workers`` local processes; ``workers > 1``
    needs ``model`` as a name or path each worker can load). ``eval_settings``: ``windows``,
    ``window``, ``prefix`` (streamed perplexity) and ``niah_cases``, ``niah_length`` (needles), on
    the calibration split; the winner is re-measured on the held-out split with the same sizes.
    ``resume``: continue the study in ``out`` (its settings are kept; ``template`` etc. must match).
    """
    import optuna

    if not (isinstance(trials, int) and trials >= 1) or not (isinstance(workers, int) and 1 <= workers <= 64):
        raise ValueError(f"trials must be an int >= 1 and workers an int in [1, 64]; got trials={trials!r}, workers={workers!r}")
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"budget is the KV fraction held, in (0, 1]; got {budget!r}")
    if workers > 1 and hasattr(model, "forward"):
        raise ValueError("workers > 1 loads the model in each worker: pass its name or path, not a loaded model")
    bad = sorted(set(eval_settings or {}) - set(DEFAULT_EVAL))
    if bad:
        raise ValueError(f"unknown eval setting {bad[0]!r}; allowed: {', '.join(DEFAULT_EVAL)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="graphwright-tune-"))
    out.mkdir(parents=True, exist_ok=True)
    storage = _storage(out)
    exists = STUDY_NAME in optuna.get_all_study_names(storage)
    if exists and not resume:
        raise ValueError(f"{out} already holds a study: pass resume=True (--resume) to continue it, or a fresh out folder")
    if resume and not exists:
        raise ValueError(f"no study to resume in {out}")
    loaded, tok = _load_model(model, tokenizer)
    if resume:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        settings = study.user_attrs["settings"]
        if settings["template"] != template:
            raise ValueError(f"the study in {out} tunes {settings['template']!r}, not {template!r}")
    else:
        settings = {"template": template, "budget": float(budget), "seed": seed, "population": population, "max_ppl_ratio": max_ppl_ratio,
                    "backend": backend, "eval": {**DEFAULT_EVAL, **(eval_settings or {})}}
        space = search_space(template, settings["eval"]["prefix"])  # errors before any work
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=_directions(settings))
        study.set_user_attr("settings", settings)
        study.set_user_attr("space", [p.to_dict() for p in space])
        ev = Evaluator(loaded, tok, split="calibration", backend=backend, seed=seed, **settings["eval"])
        study.set_user_attr("base", ev.base())
        # the initial design: drawn here from a seeded RandomSampler, enqueued so each point runs exactly once
        draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), directions=_directions(settings))
        dists = distributions(space)
        for _ in range(min(trials, population)):
            study.enqueue_trial(draw.ask(dists).params)
    if resume:
        recover_lost(study, storage)  # trials a killed run left RUNNING (resume assumes no other process runs this study)
    target = _finished(study) + trials
    for _ in range(MAX_ROUNDS):
        remaining = target - _finished(study)
        if remaining <= 0:
            break
        offset = len(study.trials)
        if workers == 1:
            run_worker(loaded, tok, str(out), remaining, offset, threads)
        else:
            _run_pool(model, tokenizer, out, remaining, workers, offset, threads)
        recover_lost(study, storage)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    result = {"out": str(out), "settings": settings, "base": study.user_attrs["base"], "trials": trial_rows(study)}
    if outputs:
        from .report import write_outputs

        result.update(write_outputs(result, loaded, tok))
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def trial_rows(study) -> list:
    """Every trial as plain data: number, state, params, recipe and measured values."""
    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params), **{k: v for k, v in t.user_attrs.items()},
                     "values": list(t.values) if t.values is not None else None})
    return rows
