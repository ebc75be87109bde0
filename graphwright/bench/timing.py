"""Timing and memory measurements of one Hugging Face generation, comparable to ``last_stats``.

graphwright's runtime reports its own prefill/decode split and KV bytes; these helpers measure
the same quantities for HF so the two can be set side by side: prefill as one forward over the
prompt with ``use_cache=True``, decode as the time from the first sampled token to the end of
``generate()`` (a logits processor timestamps each step), KV as the bytes the DynamicCache holds.
"""

from __future__ import annotations

import time

import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def cache_bytes(cache) -> int:
    """Bytes of K/V tensors in an HF cache (``DynamicCache`` layers or a legacy tuple of tuples)."""
    if cache is None:
        return 0
    if hasattr(cache, "layers"):
        return sum(tensor_bytes((getattr(layer, "keys", None), getattr(layer, "values", None))) for layer in cache.layers)
    return sum(tensor_bytes(kv) for kv in cache)


def step_timer():
    """A logits processor that records ``perf_counter()`` each time generate() picks a token."""
    from transformers import LogitsProcessor

    class _StepTimer(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    return _StepTimer()


@torch.inference_mode()
def hf_prefill(model, input_ids, attention_mask) -> float:
    """Seconds of one forward over the prompt that also builds the cache (HF's prefill)."""
    t0 = time.perf_counter()
    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    return time.perf_counter() - t0


@torch.inference_mode()
def hf_generate(model, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int = 0) -> dict:
    """Greedy HF generate of exactly ``max_new_tokens``; returns its tokens, decode time and cache bytes."""
    from transformers import LogitsProcessorList

    timer = step_timer()
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
                         logits_processor=LogitsProcessorList([timer]), return_dict_in_generate=True)
    end = time.perf_counter()
    steps = len(timer.stamps) - 1  # forwards after the prefill
    decode_s = end - timer.stamps[0]
    kv = cache_bytes(out.past_key_values)
    B = input_ids.shape[0]
    return {"tokens": out.sequences, "decode_s": decode_s, "steps": steps,
            "decode_tokens_per_s": B * steps / decode_s if steps and decode_s > 0 else 0.0,
            "kv_bytes": kv, "kv_peak_bytes": kv}  # a dense cache only grows: the final size is the peak


def rotated(keys: list, i: int) -> list:
    """``keys`` in the order of round ``i`` when the first side rotates each round (round 0: as given), so that no
    side always runs right after the same other one (a side's after-effects, e.g. spinning threads or a cold cache,
    then fall on every side in turn)."""
    n = i % len(keys) if keys else 0
    return keys[n:] + keys[:n]


def alternate(fns: dict, rounds: int, rotate: bool = False) -> dict:
    """{name: [wall seconds per call]}: ``rounds`` rounds, each calling every function of ``fns`` once in order,
    so baseline and candidates share the machine's state (the benchmarks' rule: alternate in one process).
    ``rotate``: the order rotates each round (``rotated``)."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (rotated(names, r) if rotate else names):
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times
