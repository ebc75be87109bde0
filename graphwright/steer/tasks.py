"""Seeded synthetic PASTA tasks: JSON formatting and pronoun change (ALGORITHMS.md section 6).

Each example is a short biography -- ``"{Name} is a {occupation}. {He/She} ..."`` with filler
sentences -- followed by the paper's instruction (``InstructionEvaluator`` prompt 0) and one or
two unrelated sentences after it, so the instruction is *buried* and a small model tends to
continue the story instead of obeying it. The instruction sentence is the emphasized span, as in
the paper's code. Everything is generated from a seed (no data files, no downloads); train and
held-out splits come from separate seeded streams and never share a person.

Tasks are plain objects: a ``Task`` holds ``Example``s and a scorer ``score(generation, example)
-> {metric: 0/1}``; ``Task.evaluate(generations)`` averages them. ``metric`` names the one used to
rank heads. Any object with ``name``, ``examples`` (each with ``.prompt`` and ``.emphasis``, a
tuple of substrings) and either ``evaluate(generations)`` or ``scorer`` works the same
(``evaluate_task``), so users bring their own tasks.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable

FIRST = {"she": ["Alice", "Maria", "Sofia", "Emma", "Grace", "Hannah", "Chloe", "Laura", "Nadia", "Olivia",
                 "Priya", "Rosa", "Yuki", "Zara", "Elena"],
         "he": ["James", "Omar", "Lucas", "Daniel", "Ethan", "Felix", "Henry", "Ivan", "Jonah", "Kenji",
                "Liam", "Mateo", "Noah", "Pavel", "Samuel"]}
LAST = ["Smith", "Garcia", "Novak", "Okafor", "Tanaka", "Muller", "Rossi", "Kowalski", "Haddad", "Larsen",
        "Fischer", "Moreau", "Silva", "Cohen", "Petrov", "Walsh", "Nguyen", "Berg", "Costa", "Reyes"]
OCCUPATIONS = ["nurse", "architect", "teacher", "dentist", "photographer", "lawyer", "journalist", "pilot",
               "chef", "surgeon", "painter", "accountant", "librarian", "pharmacist", "engineer", "professor",
               "firefighter", "poet", "dietitian", "veterinarian"]
PRONOUNS = {"she": ("She", "her", "her"), "he": ("He", "his", "him")}
FILLER = [  # {P} subject pronoun, {Pos} possessive, {Obj} object
    "{P} grew up in a small town near the coast.", "{P} enjoys hiking with friends on weekends.",
    "{Pos} favourite food is fresh bread with olive oil.", "Most mornings {p} walks to work.",
    "{P} has two cats and a large collection of books.", "Friends describe {Obj} as patient and curious.",
    "{P} studied abroad for a year before returning home.", "{P} plays the piano in the evenings.",
    "Last summer {p} travelled to Portugal with {pos} family.", "{P} volunteers at the community garden.",
]
AFTER = ["The town library closes early on Sundays.", "It rained for most of the week.",
         "The local bakery sells bread until noon.", "Tickets for the spring concert sold out quickly.",
         "The river path is popular with cyclists."]
JSON_INSTRUCTION = ("Answer the occupation of {name} and generate the answer as json format. Here is an example: "
                    "{{\"name\": , \"occupation\": ,}}. Now generate the answer.")
PRONOUN_INSTRUCTION = ("For the aforementioned text, substitute 'she' and 'he' with 'they' and generate the "
                       "occupation of {name} after changing pronouns.")
SUB_PRONOUNS = {"she", "he"}
ALL_PRONOUNS = {"she", "he", "her", "him", "hers", "his", "herself", "himself"}


@dataclass(frozen=True)
class Example:
    prompt: str
    emphasis: tuple  # substrings of ``prompt`` to emphasize
    target: str
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    name: str
    examples: list
    scorer: Callable
    metric: str  # the metric heads are ranked by

    def evaluate(self, generations) -> dict:
        """Mean of every metric over the examples (``generations`` aligned with ``examples``)."""
        if len(generations) != len(self.examples):
            raise ValueError(f"{len(generations)} generations for {len(self.examples)} examples")
        return _scores_mean([self.scorer(g, ex) for g, ex in zip(generations, self.examples)])


def _scores_mean(rows: list) -> dict:
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in rows[0]}


def evaluate_task(task, generations) -> dict:
    """Mean scores of ``generations`` on any task-like object: its ``evaluate(generations)`` if it
    has one, else the mean of ``task.scorer(generation, example)`` over ``task.examples``."""
    if hasattr(task, "evaluate"):
        return task.evaluate(generations)
    if not callable(getattr(task, "scorer", None)):
        raise ValueError(f"task {task!r} needs an evaluate(generations) method or a scorer(generation, example) function")
    if len(generations) != len(task.examples):
        raise ValueError(f"{len(generations)} generations for {len(task.examples)} examples")
    return _scores_mean([task.scorer(g, ex) for g, ex in zip(generations, task.examples)])


def task_metric(task, scores: dict) -> str:
    """The metric heads are ranked by: ``task.metric``, else the first one the scorer returns."""
    metric = getattr(task, "metric", None) or next(iter(scores))
    if metric not in scores:
        raise ValueError(f"task metric {metric!r} is not among the scorer's metrics {sorted(scores)}")
    return metric


def subset(task, n: int):
    """The task restricted to its first ``n`` examples (a shallow copy; the original is untouched)."""
    import copy

    out = copy.copy(task)
    out.examples = list(task.examples)[:n]
    return out


# ---- scorers (the paper's metrics, pastalib evaluation/evaluator.py) ----

def _json_objects(text: str):
    """Every ``{...}`` substring that ``json.loads`` parses, as the paper's json_EM tries them."""
    begs = [i for i, c in enumerate(text) if c == "{"]
    ends = [i for i, c in enumerate(text) if c == "}"]
    for b in begs:
        for e in ends:
            if e > b:
                try:
                    yield json.loads(text[b:e + 1])
                except ValueError:
                    continue


def score_json(generation: str, ex: Example) -> dict:
    em, acc = False, False
    target = ex.target.lower()
    for obj in _json_objects(generation.strip()):
        em = True
        values = obj.values() if isinstance(obj, dict) else []
        if any(isinstance(v, str) and target in v.lower() for v in values):
            acc = True
            break
    return {"json_pred_acc": acc, "json_EM": em}


def score_pronoun(generation: str, ex: Example) -> dict:
    """pron_sub_acc / pron_all_acc as the paper; pron_occ_acc also needs the occupation named,
    so that empty or degenerate text (which trivially contains no pronoun) does not score."""
    words = re.findall(r"[a-z]+", generation.lower())
    sub = not any(w in SUB_PRONOUNS for w in words)
    every = not any(w in ALL_PRONOUNS for w in words)
    return {"pron_occ_acc": every and ex.target.lower() in generation.lower(), "pron_sub_acc": sub, "pron_all_acc": every}


# ---- generators ----

def _person(rng: random.Random, used: set, last_names: list):
    if len(used) >= 2 * len(FIRST["she"]) * len(last_names):
        raise ValueError(f"at most {2 * len(FIRST['she']) * len(last_names)} distinct people per split")
    while True:
        gender = rng.choice(["she", "he"])
        name = f"{rng.choice(FIRST[gender])} {rng.choice(last_names)}"
        if name not in used:
            used.add(name)
            return name, gender


def _bio(rng: random.Random, name: str, gender: str, occupation: str) -> str:
    P, pos, obj = PRONOUNS[gender]
    fill = rng.sample(FILLER, rng.randint(3, 5))
    sents = [f"{name} is a {occupation}."] + [f.format(P=P, p=P.lower(), Pos=pos.capitalize(), pos=pos, Obj=obj) for f in fill]
    return " ".join(sents)


def _examples(kind: str, n: int, rng: random.Random, last_names: list) -> list:
    out, used = [], set()
    for _ in range(n):
        name, gender = _person(rng, used, last_names)
        occupation = rng.choice(OCCUPATIONS)
        instruction = (JSON_INSTRUCTION if kind == "json" else PRONOUN_INSTRUCTION).format(name=name)
        after = " ".join(rng.sample(AFTER, rng.randint(1, 2)))
        prompt = f"{_bio(rng, name, gender, occupation)}\n{instruction}\n{after}"
        out.append(Example(prompt, (instruction,), occupation, {"name": name, "gender": gender}))
    return out


TASKS = {"json": (score_json, "json_pred_acc"), "pronoun": (score_pronoun, "pron_occ_acc")}


def make_splits(name: str, n_train: int = 24, n_test: int = 40, seed: int = 0) -> tuple:
    """(train Task, held-out Task). Each split has its own seeded stream and its own half of the
    surnames, so the splits never share a person and the held-out split does not depend on
    ``n_train`` (profile on any number of training examples, measure on the same test set)."""
    if name not in TASKS:
        raise ValueError(f"unknown steering task {name!r}; available: {', '.join(TASKS)}")
    scorer, metric = TASKS[name]
    half = len(LAST) // 2
    train = _examples(name, n_train, random.Random(f"{name}/{seed}/train"), LAST[:half])
    test = _examples(name, n_test, random.Random(f"{name}/{seed}/test"), LAST[half:])
    return Task(name, train, scorer, metric), Task(name, test, scorer, metric)


def make_task(name: str, n: int = 24, seed: int = 0, split: str = "train") -> Task:
    """One split of ``make_splits`` (``split="test"`` = the held-out people)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    train, test = make_splits(name, n if split == "train" else 0, n if split == "test" else 0, seed)
    return train if split == "train" else test
