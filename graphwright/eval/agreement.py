"""Greedy agreement: how often a compiled model writes exactly what its base model writes.

Perplexity says how well a lossy recipe predicts text; agreement says whether a user would see
a different answer. For each prompt both sides decode greedily for ``max_new_tokens`` (no EOS
stop, so the lengths match) and we report, per prompt and on average:

* ``prefix``: the fraction of new tokens before the first divergence (1.0 = identical output);
* ``match``: the fraction of positions where the tokens are equal;
* ``exact``: the fraction of prompts whose whole continuation is identical.

The prompts are passages of the shipped novel at seeded offsets (``agreement_prompts``), so the
measurement is offline and the same on every machine. The base side is the Hugging Face model's
own ``generate()`` when given one (not graphwright's identity graph), so the number also covers
capture.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from .data import read_text


def agreement_prompts(tokenizer, n: int = 20, tokens: int = 48, seed: int = 0, path=None) -> list:
    """``n`` LongTensors [1, tokens]: passages of the text starting at seeded token offsets."""
    if n < 1 or tokens < 1:
        raise ValueError(f"need n >= 1 prompts of tokens >= 1; got n={n}, tokens={tokens}")
    ids = tokenizer(read_text(path), add_special_tokens=False)["input_ids"]
    if len(ids) < tokens + 1:
        raise ValueError(f"the text has {len(ids)} tokens; prompts of {tokens} need more")
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(len(ids) - tokens), n))
    return [torch.tensor([ids[s:s + tokens]], dtype=torch.long) for s in starts]


def _continuation(model_or_cm, ids, max_new_tokens: int) -> torch.Tensor:
    if hasattr(model_or_cm, "step_graph"):  # CompiledModel (or anything with its generate())
        out = model_or_cm.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=[])
    else:
        with torch.inference_mode():
            out = model_or_cm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                       pad_token_id=getattr(model_or_cm.config, "eos_token_id", None) or 0)
    return out[0, ids.shape[1]:]


def compare_greedy(base, cm, tokenizer=None, n_prompts: int = 20, prompt_tokens: int = 48, max_new_tokens: int = 32,
                   seed: int = 0, path=None, progress: bool = True, prompts=None, base_cache: dict | None = None) -> dict:
    """Greedy continuations of ``base`` and ``cm`` on the same prompts; agreement as plain data.

    ``prompts``: LongTensors [1, T] to use instead of passages of the text (then no tokenizer is needed).
    ``base_cache``: a dict shared across calls (a sweep) so the base model decodes each prompt once.
    """
    if prompts is None:
        if tokenizer is None:
            raise ValueError("compare_greedy needs a tokenizer to cut prompts from the text, or prompts=[ids, ...]")
        prompts = agreement_prompts(tokenizer, n_prompts, prompt_tokens, seed, path)
    prompt_tokens = prompts[0].shape[1]
    rows = []
    for ids in tqdm(prompts, desc="greedy agreement", unit="prompt", disable=None if progress else True, leave=False):
        key = (tuple(ids[0].tolist()), max_new_tokens)
        if base_cache is None or key not in base_cache:
            a = _continuation(base, ids, max_new_tokens)
            if base_cache is not None:
                base_cache[key] = a
        a, b = (base_cache[key] if base_cache is not None else a), _continuation(cm, ids, max_new_tokens)
        n = min(a.numel(), b.numel())
        equal = (a[:n] == b[:n]).tolist()
        first = equal.index(False) if False in equal else n
        rows.append({"prefix": first / max_new_tokens, "match": sum(equal) / max_new_tokens,
                     "exact": float(first == max_new_tokens == a.numel() == b.numel())})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("prefix", "match", "exact")}
    return {"prompts": len(rows), "prompt_tokens": prompt_tokens, "new_tokens": max_new_tokens, "seed": seed,
            **mean, "per_prompt": rows}
