"""Greedy agreement: identity agrees exactly, a lossy recipe does not, prompts are seeded passages."""

import torch

import graphwright as gw
from graphwright.eval.agreement import agreement_prompts, compare_greedy


def _prompts(n=4, t=10):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (1, t), generator=g) for _ in range(n)]


def test_identity_agrees_and_lossy_diverges(tiny, compiled_tiny):
    model = tiny("tiny-llama")
    same = compare_greedy(model, compiled_tiny("tiny-llama"), prompts=_prompts(), max_new_tokens=12, progress=False)
    assert same["prefix"] == same["match"] == same["exact"] == 1.0 and same["prompts"] == 4
    lossy = gw.compile(model, recipe="lowrank_kv(keep=0.2)")
    r = compare_greedy(model, lossy, prompts=_prompts(), max_new_tokens=12, progress=False)
    assert r["exact"] < 1.0 and r["prefix"] <= r["match"] < 1.0
    # the per-prompt numbers are what the means summarise
    assert abs(r["prefix"] - sum(p["prefix"] for p in r["per_prompt"]) / 4) < 1e-12


def test_prompts_are_seeded_passages_of_the_text():
    class Chars:  # a character "tokenizer": ids are code points
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    a = agreement_prompts(Chars(), n=5, tokens=30, seed=1)
    b = agreement_prompts(Chars(), n=5, tokens=30, seed=1)
    assert len(a) == 5 and all(x.shape == (1, 30) for x in a) and all(torch.equal(x, y) for x, y in zip(a, b))
    text = "".join(chr(i) for i in a[0][0].tolist())
    from graphwright.eval.data import read_text

    assert text in read_text()
    assert not all(torch.equal(x, y) for x, y in zip(a, agreement_prompts(Chars(), n=5, tokens=30, seed=2)))


def test_base_cache_decodes_the_base_once_per_prompt(tiny, compiled_tiny):
    model = tiny("tiny-llama")
    lossy = gw.compile(model, recipe="lowrank_kv(keep=0.3)")
    calls = []

    class Counting:  # the base model, counting its generate() calls
        config = model.config

        def generate(self, ids, **kw):
            calls.append(ids)
            return model.generate(ids, **kw)

    cache = {}
    first = compare_greedy(Counting(), lossy, prompts=_prompts(), max_new_tokens=8, progress=False, base_cache=cache)
    again = compare_greedy(Counting(), lossy, prompts=_prompts(), max_new_tokens=8, progress=False, base_cache=cache)
    assert len(calls) == 4 and len(cache) == 4  # the second sweep point reused every base continuation
    uncached = compare_greedy(model, lossy, prompts=_prompts(), max_new_tokens=8, progress=False)
    assert first["per_prompt"] == again["per_prompt"] == uncached["per_prompt"]
