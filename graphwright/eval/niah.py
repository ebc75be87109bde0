"""Seeded synthetic needle-in-a-haystack: can the model still find one fact in a long prompt?

KV-cache passes (eviction, low-rank keys, prompt filtering) are lossy exactly where a single
early token matters, so a length x depth grid shows what a ΔPPL average hides. Everything is
generated offline from a seed: filler sentences sampled from the shipped novel, the needle
"The best thing to do in {city} is {activity}." inserted at a token-exact depth of the
filler, and the question asked through the tokenizer's chat template when it has one. The
answer is primed with "The best thing to do in {city} is" (as in the original Claude NIAH
runs) so that a small model answers in a handful of greedy tokens; scoring is exact
(case-insensitive) substring match of the activity.

``needle_grid`` is the small length x depth grid; ``needle_suite`` is the suite at scale (issue
18): ``cases`` per length at depths spread evenly over 0..1, three needle templates
(``TEMPLATES``) and two haystacks, the novel's sentences (standing in for RULER's Paul Graham
essays) and RULER's noise text, each dealt equally often and independently of depth.
"""

from __future__ import annotations

import functools
import random
import re
import time

import torch
from tqdm.auto import tqdm

from .data import read_text

# Cities absent from the novel, activities no model can guess from the city name.
CITIES = ("Lisbon", "Kyoto", "Nairobi", "Montreal", "Reykjavik", "Santiago", "Hanoi", "Tbilisi", "Auckland",
          "Marrakesh", "Oslo", "Lima", "Seoul", "Vienna", "Cape Town", "Helsinki", "Dubrovnik", "Quito", "Osaka", "Tallinn")
ACTIVITIES = ("feed the ducks at the old mill", "ride a red bicycle along the river", "eat a lemon cake on the pier",
              "play chess with the lighthouse keeper", "paint the blue doors of the harbour",
              "count the pigeons in the flower market", "swim in the green lake at dawn",
              "fly a paper kite from the clock tower", "sing in the tiny church choir",
              "buy a striped umbrella at the night market", "climb the orange stairs behind the bakery",
              "read poems to the sleeping cats", "drink mint tea with the boat builders",
              "collect shells on the windy beach", "learn to juggle in the main square",
              "walk backwards across the stone bridge")

INSTRUCTION = "Read the text below and answer the question at the end."
QUESTION = "What is the best thing to do in {city}?"
NEEDLE = "The best thing to do in {city} is {activity}."
PRIMER = "The best thing to do in {city} is"
# Needle templates: (needle, question, answer primer). Template 0 is the original one.
TEMPLATES = (
    (NEEDLE, QUESTION, PRIMER),
    ("In {city}, the favourite pastime of the locals is to {activity}.", "What is the favourite pastime of the locals in {city}?",
     "In {city}, the favourite pastime of the locals is to"),
    ("Anyone who visits {city} should {activity}.", "What should anyone who visits {city} do?", "Anyone who visits {city} should"),
)
# RULER's noise haystack (niah_single_1), repeated as often as needed.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("novel", "noise")


@functools.lru_cache(maxsize=1)
def filler_sentences() -> tuple:
    """Plain sentences of the shipped novel (whitespace normalised, no headings or italics marks)."""
    text = " ".join(read_text().replace("_", "").split())
    sents = re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text)
    return tuple(s for s in sents if 40 <= len(s) <= 250 and "CHAPTER" not in s and not any(c.isdigit() for c in s))


def _has_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, user: str, primer: str) -> str:
    """``user`` as the user turn (chat template when the tokenizer has one), then the answer ``primer``."""
    if _has_chat(tokenizer):
        head = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return head + primer
    return f"{user}\nAnswer: {primer}"


def build_prompt(tokenizer, context: str, city: str, template: int = 0) -> str:
    """The full prompt text: instruction, context, question, then the answer primer."""
    _, question, primer = TEMPLATES[template]
    user = f"{INSTRUCTION}\n\n{context}\n\nQuestion: {question.format(city=city)} Answer in one sentence."
    return chat_prompt(tokenizer, user, primer.format(city=city))


def encode(tokenizer, prompt: str, **kw):
    """Tokenise a prompt from ``build_prompt`` (chat-templated text already holds its special tokens)."""
    return tokenizer(prompt, add_special_tokens=not _has_chat(tokenizer), **kw)


def _word_start(tokenizer, hay_ids, k: int) -> int:
    """The token index nearest ``k`` where a word starts, so the needle never splits a word."""
    n = len(hay_ids)
    for d in range(n + 1):
        for j in (k - d, k + d):
            if j in (0, n) or (0 < j < n and tokenizer.decode(hay_ids[j:j + 1]).startswith(" ")):
                return j
    return k


def _make_case(tokenizer, hay_text: str, length: int, depth: float, city: str, activity: str, template: int = 0) -> dict:
    needle = TEMPLATES[template][0].format(city=city, activity=activity)
    hay_all = tokenizer(hay_text, add_special_tokens=False).input_ids
    budget = length - len(encode(tokenizer, build_prompt(tokenizer, needle, city, template)).input_ids) - 1
    for _ in range(4):  # re-tokenisation at the seams can shift a token or two: converge on the length
        if budget < 1:
            raise ValueError(f"length {length} is too short for the needle and question; use >= {length - budget + 16}")
        hay = hay_all[:budget]
        k = _word_start(tokenizer, hay, round(depth * len(hay)))
        before, after = tokenizer.decode(hay[:k]), tokenizer.decode(hay[k:])
        if after and not after.startswith(" "):
            after = " " + after
        context = (before + " " if before else "") + needle + after
        prompt = build_prompt(tokenizer, context, city, template)
        enc = encode(tokenizer, prompt, return_offsets_mapping=True)
        n = len(enc.input_ids)
        if n == length:
            break
        budget += length - n
    offs = enc.offset_mapping

    def tok_at(char):  # index of the first token ending after ``char``
        return next(i for i, (_, e) in enumerate(offs) if e > char)

    c0 = prompt.index(context)
    n0 = prompt.index(needle, c0)
    ctx_start, ctx_end = tok_at(c0), tok_at(c0 + len(context) - 1) + 1
    needle_start, needle_end = tok_at(n0), tok_at(n0 + len(needle) - 1) + 1
    return {"length": length, "depth": depth, "prompt_tokens": n, "city": city, "activity": activity,
            "needle_token": needle_start, "needle_tokens": needle_end - needle_start,
            "context_span": [ctx_start, ctx_end], "template": template, "prompt": prompt}


def haystack_text(kind: str, rng: random.Random, length: int) -> str:
    """Well over ``length`` tokens of filler: seeded novel sentences, or RULER's noise sentences repeated."""
    if kind == "noise":
        return " ".join([NOISE] * (length // 4 + 8))
    if kind != "novel":
        raise ValueError(f"haystack must be one of {HAYSTACKS}; got {kind!r}")
    pool, hay, chars = filler_sentences(), [], 0
    while chars < length * 8:
        hay.append(rng.choice(pool))
        chars += len(hay[-1]) + 1
    return " ".join(hay)


def needle_suite(tokenizer, lengths=(1024, 2048, 4096, 8192), cases: int = 50, seed: int = 0,
                 templates=None, haystacks=HAYSTACKS) -> list:
    """``cases`` needle cases per length at depths ``i / (cases - 1)`` (0 to 1 evenly), seeded.

    Each case gets its own haystack (seeded novel sentences, or RULER's noise text standing in
    for its "noise" haystack; the novel stands in for RULER's Paul Graham essays), a city and an
    activity, and one of the needle ``templates`` (indices into ``TEMPLATES``; all by default).
    Templates and haystack kinds are dealt round-robin over a seeded permutation of the cases, so
    each appears equally often and independently of depth. The question comes after the context.
    """
    if tokenizer is None:
        raise ValueError("needle_suite needs the model's tokenizer (tiny random models have none)")
    if not isinstance(cases, int) or cases < 1:
        raise ValueError(f"cases must be a positive int; got {cases!r}")
    templates = tuple(range(len(TEMPLATES))) if templates is None else tuple(templates)
    if not templates or any(t not in range(len(TEMPLATES)) for t in templates):
        raise ValueError(f"templates must be indices in [0, {len(TEMPLATES)}); got {list(templates)}")
    bad = [h for h in haystacks if h not in HAYSTACKS]
    if bad or not haystacks:
        raise ValueError(f"haystacks must be some of {HAYSTACKS}; got {list(haystacks)}")
    out = []
    for length in lengths:
        rng = random.Random(f"graphwright-niah-suite-{seed}-{length}")
        order = list(range(cases))
        rng.shuffle(order)
        for i in range(cases):
            depth = i / (cases - 1) if cases > 1 else 0.5
            template = templates[order[i] % len(templates)]
            kind = haystacks[(order[i] // len(templates)) % len(haystacks)]
            city, activity = rng.choice(CITIES), rng.choice(ACTIVITIES)
            case = _make_case(tokenizer, haystack_text(kind, rng, int(length)), int(length), float(depth), city, activity, template)
            out.append({"id": f"L{length}-c{i}", "repeat": 0, "haystack": kind, **case})
    return out


def needle_grid(tokenizer, lengths=(256, 512), depths=(0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0,
                repeats: int = 1) -> list:
    """Cases for every (length, depth), ``repeats`` haystacks per length, deterministic per ``seed``.

    ``length`` is the whole prompt in the model's tokens (template and primer included); ``depth``
    is the fraction of the filler that precedes the needle (0 = first, 1 = last). Each case is
    plain data: the prompt text, the expected activity and where the needle sits in tokens.
    """
    if tokenizer is None:
        raise ValueError("needle_grid needs the model's tokenizer (tiny random models have none)")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1]; got {list(depths)}")
    cases = []
    for length in lengths:
        for r in range(repeats):
            rng = random.Random(f"graphwright-niah-{seed}-{length}-{r}")
            hay_text = haystack_text("novel", rng, int(length))
            for d in depths:
                city, activity = rng.choice(CITIES), rng.choice(ACTIVITIES)
                case = _make_case(tokenizer, hay_text, int(length), float(d), city, activity)
                cases.append({"id": f"L{length}-d{d:g}-r{r}", "repeat": r, **case})
    return cases


def is_correct(answer: str, activity: str) -> bool:
    """Exact-match scoring: the activity appears in the answer (case and spacing ignored)."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    return norm(activity) in norm(answer)


@torch.inference_mode()
def _generate(model_or_cm, ids, max_new_tokens: int, eos):
    if isinstance(model_or_cm, torch.nn.Module):
        out = model_or_cm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=eos, pad_token_id=eos)
    else:
        # prompts fill the length exactly (8,192 = SmolLM2's max_positions): the answer runs a few positions past it,
        # as the HF baseline above does without asking
        out = model_or_cm.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos, allow_long=True)
    return out[0, ids.shape[1]:]


def _accuracy(rows, keys):
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r["correct"])
    return [{**dict(zip(keys, g)), "accuracy": sum(v) / len(v), "n": len(v)} for g, v in sorted(groups.items())]


def run_niah(model_or_cm, tokenizer, cases, max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Greedy answers for each case, scored; HF models use HF ``generate``, compiled ones ``cm.generate``.

    Returns ``{"accuracy", "grid": [{length, depth, accuracy, n}], "by_length", "by_depth",
    "cases": [{id, length, depth, prompt_tokens, city, activity, answer, correct}], "seconds"}``.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model_or_cm, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("run_niah needs the model's tokenizer")
    eos = tokenizer.eos_token_id
    rows, t0 = [], time.perf_counter()
    for case in tqdm(cases, desc="niah", unit="case", disable=None if progress else True, leave=False):
        ids = torch.tensor([encode(tokenizer, case["prompt"]).input_ids])
        new = _generate(model_or_cm, ids, max_new_tokens, eos)
        answer = tokenizer.decode(new, skip_special_tokens=True)
        stats = getattr(model_or_cm, "last_stats", None) or {}
        rows.append({k: case[k] for k in ("id", "length", "depth", "prompt_tokens", "city", "activity")}
                    | {k: case[k] for k in ("template", "haystack") if k in case}
                    | {"answer": answer, "correct": is_correct(answer, case["activity"]), "kv_bytes": stats.get("kv_bytes")})
    return {"accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)),
            "grid": _accuracy(rows, ("length", "depth")), "by_length": _accuracy(rows, ("length",)),
            "by_depth": _accuracy(rows, ("depth",)), "cases": rows, "seconds": time.perf_counter() - t0}


def compare_niah(base, cm, tokenizer=None, cases=None, base_result: dict | None = None, **kwargs) -> dict:
    """The same cases through the base model and ``cm``: accuracies, their difference, answer agreement.

    ``base_result``: the base side's ``run_niah`` result on the same cases (a sweep runs the base once)."""
    tokenizer = tokenizer if tokenizer is not None else getattr(cm, "tokenizer", None)
    cases = cases if cases is not None else needle_grid(tokenizer)
    b = base_result if base_result is not None else run_niah(base, tokenizer, cases, **kwargs)
    c = run_niah(cm, tokenizer, cases, **kwargs)
    same = sum(x["answer"] == y["answer"] for x, y in zip(b["cases"], c["cases"]))
    return {"base": b, "compiled": c, "delta": c["accuracy"] - b["accuracy"], "agreement": same / max(1, len(cases))}
