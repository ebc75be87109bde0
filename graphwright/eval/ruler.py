"""RULER-style synthetic long-context tasks (arXiv 2404.06654), generated offline from a seed.

Tasks (ALGORITHMS-2.md section 9; ``SPECS`` holds the settings):

* ``niah_multikey_1``: one needle "One of the special magic numbers for {key} is: {value}." to
  find among 3 distractor needles with other keys, in a novel haystack (RULER multikey_1);
* ``niah_multikey_2``: the haystack is nothing but distractor needles (RULER multikey_2);
* ``niah_multivalue``: one key with 4 values, all to be recalled; ``niah_multiquery``: 4 keys,
  all queried (answer: their 4 values);
* ``vt``: variable tracking, one chain of 4 hops ("VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ...)
  in RULER's noise haystack; answer: the 5 names that end up holding the value;
* ``cwe``: common-word extraction from a numbered list where 10 words appear 30 times and the
  rest 3 times (6 and 1 below 4,096 tokens); answer: the 10 common words.

Substitutes for RULER's downloaded data, so every case is built from files shipped in the
package: the novel ``graphwright/data/northangerabbey.txt`` (its plain sentences,
``niah.filler_sentences``) stands in for the Paul Graham essay haystack; the hand-written lists
``graphwright/data/adjectives.txt`` and ``nouns.txt`` stand in for wonderwords in the
"adjective-noun" keys; the novel's own vocabulary (distinct lowercase words of 4-10 letters)
stands in for ``english_words.json`` in cwe. Deviations from RULER, kept deliberate: needles
go at uniform random depths (RULER uses 40 fixed depths for essays), values are 7-digit
numbers only (no uuids), vt and cwe have no in-context example, and each prompt ends with an
answer primer (RULER's ``answer_prefix``) so a small model answers at once. A case's ``length``
is the model's tokens of prompt plus ``max_new_tokens`` (RULER's max_seq_length), filled by
adding haystack units until the next would overflow (checked with the real tokenizer).

Scoring is RULER's ``string_match_all``: the fraction of reference strings found in the answer
(case-insensitive). ``chance`` per case is the expected score of naming as many items as there
are references uniformly from the pool the task draws them from: 0 for 7-digit numbers and
5-letter names (about 1e-7), ``10 / distinct words shown`` for cwe. ``above_chance`` decides on the
paired bootstrap interval of score - chance (``graphwright.eval.stats``).
"""

from __future__ import annotations

import functools
import random
import re
import string
import time
from importlib import resources

import torch
from tqdm.auto import tqdm

from .data import read_text
from .niah import NOISE, _generate, chat_prompt, encode, filler_sentences
from .stats import bootstrap_mean, paired_difference

SPECS = {
    "niah_multikey_1": {"haystack": "novel", "keys": 4, "values": 1, "queries": 1, "max_new_tokens": 24},
    "niah_multikey_2": {"haystack": "needle", "keys": 1, "values": 1, "queries": 1, "max_new_tokens": 24},
    "niah_multivalue": {"haystack": "novel", "keys": 1, "values": 4, "queries": 1, "max_new_tokens": 64},
    "niah_multiquery": {"haystack": "novel", "keys": 4, "values": 1, "queries": 4, "max_new_tokens": 64},
    "vt": {"hops": 4, "max_new_tokens": 40},
    "cwe": {"common": 10, "max_new_tokens": 80},
}
TASKS = tuple(SPECS)

NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n{context}\n{ask}")
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {value} in the text above.")
VT_PRIMER = "According to the chain(s) of variable assignment in the text above, {n} variables are assigned the value {value}, they are:"
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PRIMER = "The top 10 words that appear most often in the list are:"


@functools.lru_cache(maxsize=None)
def word_list(name: str) -> tuple:
    """A shipped word list (``adjectives`` or ``nouns``), one word a line, ``#`` comments skipped."""
    text = (resources.files("graphwright") / "data" / f"{name}.txt").read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


@functools.lru_cache(maxsize=1)
def novel_vocabulary() -> tuple:
    """Distinct lowercase words of 4-10 letters in the novel, sorted (the cwe word pool)."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", read_text()))))


def string_match_all(prediction: str, references) -> float:
    """RULER's metric: the fraction of ``references`` found (case-insensitive) in the stripped prediction."""
    pred = re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).lower()
    refs = list(references)
    if not refs:
        raise ValueError("string_match_all needs at least one reference")
    return sum(r.lower() in pred for r in refs) / len(refs)


def _keys(rng, n):
    adj, noun, out = word_list("adjectives"), word_list("nouns"), []
    while len(out) < n:
        k = f"{rng.choice(adj)}-{rng.choice(noun)}"
        if k not in out:
            out.append(k)
    return out


def _numbers(rng, n, taken=()):
    out = []
    while len(out) < n:
        v = str(rng.randint(10**6, 10**7 - 1))
        if v not in out and v not in taken:
            out.append(v)
    return out


def _fit(tokenizer, build, unit_tokens, limit: int):
    """The largest unit count ``n`` with tokens(build(n)) <= limit: estimate from per-unit counts, then check."""
    base = len(encode(tokenizer, build(0)).input_ids)
    if base > limit:
        raise ValueError(f"length {limit} is too short for the task's template and needles ({base} tokens); use a longer length")
    n, total = 0, base
    while n < len(unit_tokens) and total + unit_tokens[n] <= limit:
        total += unit_tokens[n]
        n += 1
    for _ in range(64):  # seams tokenise a little differently from the units alone: step down until it fits
        got = len(encode(tokenizer, build(n)).input_ids)
        if got <= limit or n == 0:
            return n, got
        per_unit = max(1, (got - base) // n)  # measured, not estimated
        n = max(0, n - max(1, -(-(got - limit) // per_unit)))
    raise RuntimeError("could not fit the haystack to the length")  # unreachable for real tokenizers


def _unit_lengths(tokenizer, units):
    return [len(ids) for ids in tokenizer([" " + u for u in units], add_special_tokens=False).input_ids]


def _pool(kind: str, rng, length: int, needle_keys=()):
    """Haystack units (sentences, each >= ~10 tokens) well over ``length`` tokens: novel sentences, noise, or distractor needles."""
    n = length // 8 + 8
    if kind == "novel":
        pool = filler_sentences()
        return [rng.choice(pool) for _ in range(n)]
    if kind == "noise":
        return [NOISE] * n
    keys = [k for k in _keys(rng, n + len(needle_keys)) if k not in needle_keys]
    return [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, _numbers(rng, len(keys)))]


def _insert(units, n, inserts):
    """``units[:n]`` with each (depth, text) of ``inserts`` placed at index round(depth * n) (in order)."""
    out = list(units[:n])
    for depth, text in sorted(inserts, key=lambda x: x[0], reverse=True):
        out.insert(round(depth * n), text)
    return " ".join(out)


def _niah_case(tokenizer, spec, rng, length):
    keys = _keys(rng, spec["keys"])
    values = [_numbers(rng, spec["values"]) for _ in keys]
    needles = [(rng.random(), NIAH_NEEDLE.format(key=k, value=v)) for k, vs in zip(keys, values) for v in vs]
    query_idx = sorted(rng.sample(range(len(keys)), spec["queries"]))
    query = [keys[i] for i in query_idx]
    refs = [v for i in query_idx for v in values[i]]
    q = query[0] if len(query) == 1 else ", ".join(query[:-1]) + " and " + query[-1]
    if len(refs) == 1:
        ask, primer = (f"What is the special magic number for {q} mentioned in the provided text?",
                       f"The special magic number for {q} mentioned in the provided text is")
    else:
        ask, primer = (f"What are all the special magic numbers for {q} mentioned in the provided text?",
                       f"The special magic numbers for {q} mentioned in the provided text are")
    units = _pool(spec["haystack"], rng, length, needle_keys=keys)

    def build(n):
        return chat_prompt(tokenizer, NIAH_QUESTION.format(context=_insert(units, n, needles), ask=ask), primer)

    return build, units, refs, 0.0


def _vt_case(tokenizer, spec, rng, length):
    names = []
    while len(names) < spec["hops"] + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(spec["hops"])]
    depths = sorted(rng.random() for _ in chain)
    units = _pool("noise", rng, length)
    primer = VT_PRIMER.format(n=len(names), value=value)

    def build(n):
        return chat_prompt(tokenizer, VT_TEMPLATE.format(context=_insert(units, n, list(zip(depths, chain))), value=value), primer)

    return build, units, names, 0.0


def _cwe_case(tokenizer, spec, rng, length):
    vocab = novel_vocabulary()
    words = rng.sample(vocab, min(len(vocab), length // 2))
    common, rare = words[:spec["common"]], words[spec["common"]:]
    freq_c, freq_r = (30, 3) if length >= 4096 else (6, 1)
    shuffle_seed = rng.random()

    def listing(n_rare):
        order = common * freq_c + rare[:n_rare] * freq_r
        random.Random(shuffle_seed).shuffle(order)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(order))

    def build(n):
        return chat_prompt(tokenizer, CWE_TEMPLATE.format(context=listing(n)), CWE_PRIMER)

    unit_tokens = [freq_r * (t + 2) for t in _unit_lengths(tokenizer, rare)]  # "k. word" per repeat
    return build, rare, common, unit_tokens


def ruler_cases(tokenizer, tasks=TASKS, lengths=(1024, 2048, 4096), cases: int = 50, seed: int = 42) -> list:
    """``cases`` seeded cases per (task, length): plain data with the prompt and the references.

    Each case: ``{"id", "task", "length", "prompt", "prompt_tokens", "references", "chance",
    "max_new_tokens"}``; the same ``seed`` gives the same cases on every machine.
    """
    if tokenizer is None:
        raise ValueError("ruler_cases needs the model's tokenizer")
    bad = [t for t in tasks if t not in SPECS]
    if bad:
        raise ValueError(f"unknown RULER task(s) {bad}; available: {list(TASKS)}")
    if not isinstance(cases, int) or cases < 1:
        raise ValueError(f"cases must be a positive int; got {cases!r}")
    out = []
    for task in tasks:
        spec = SPECS[task]
        make = _cwe_case if task == "cwe" else _vt_case if task == "vt" else _niah_case
        for length in lengths:
            rng = random.Random(f"graphwright-ruler-{seed}-{task}-{length}")
            for i in range(cases):
                build, units, refs, extra = make(tokenizer, spec, rng, int(length))
                unit_tokens = extra if isinstance(extra, list) else _unit_lengths(tokenizer, units)
                n, got = _fit(tokenizer, build, unit_tokens, int(length) - spec["max_new_tokens"])
                chance = len(refs) / (len(refs) + n) if task == "cwe" else 0.0
                out.append({"id": f"{task}-L{length}-c{i}", "task": task, "length": int(length), "prompt": build(n),
                            "prompt_tokens": got, "references": list(refs), "chance": chance, "max_new_tokens": spec["max_new_tokens"]})
    return out


def run_ruler(model_or_cm, tokenizer, cases, progress: bool = True) -> dict:
    """Greedy answers per case scored with ``string_match_all``; per-case rows with the KV bytes held.

    Returns ``{"score", "by_task": {task: mean}, "cases": [{id, task, length, score, chance, answer, kv_bytes}], "seconds"}``.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model_or_cm, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("run_ruler needs the model's tokenizer")
    rows, t0 = [], time.perf_counter()
    for case in tqdm(cases, desc="ruler", unit="case", disable=None if progress else True, leave=False):
        ids = torch.tensor([encode(tokenizer, case["prompt"]).input_ids])
        new = _generate(model_or_cm, ids, case["max_new_tokens"], tokenizer.eos_token_id)
        answer = tokenizer.decode(new, skip_special_tokens=True)
        stats = getattr(model_or_cm, "last_stats", None) or {}
        rows.append({k: case[k] for k in ("id", "task", "length", "chance")}
                    | {"score": string_match_all(answer, case["references"]), "answer": answer, "kv_bytes": stats.get("kv_bytes")})
    by_task: dict = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["score"])
    return {"score": sum(r["score"] for r in rows) / max(1, len(rows)), "by_task": {t: sum(v) / len(v) for t, v in by_task.items()},
            "cases": rows, "seconds": time.perf_counter() - t0}


def above_chance(dense_rows, seed: int = 0) -> dict:
    """Per task: dense's mean score, mean chance, the paired 95% interval of score - chance, and ``above``.

    ``above`` is True when the interval's lower end is > 0: the dense model does the task better
    than naming answers at random, so the task can rank compression methods (the headline); the
    others are reported separately.
    """
    by_task: dict = {}
    for r in dense_rows:
        by_task.setdefault(r["task"], []).append(r)
    out = {}
    for task, rows in by_task.items():
        scores, chance = [r["score"] for r in rows], [r["chance"] for r in rows]
        margin = paired_difference(chance, scores, seed=seed)
        out[task] = {"score": bootstrap_mean(scores, seed=seed), "chance": sum(chance) / len(chance), "margin": margin,
                     "above": margin["lo"] > 0}
    return out
