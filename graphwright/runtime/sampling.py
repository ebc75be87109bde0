"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seeded generator."""

from __future__ import annotations

import math
import numbers

import torch

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed


def _real(name: str, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, {allowed}; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, {allowed}; got {value}")
    return value


def _int(name: str, value, allowed: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be an integer, {allowed}; got {value!r}")
    return int(value)


def check_sampling(do_sample, temperature, top_k, top_p, seed) -> tuple:
    """Validated ``(do_sample, temperature, top_k, top_p, seed)``; ValueError naming the argument and its range.

    Checked whether or not ``do_sample`` is set (a bad value is a mistake either way), except that
    greedy decoding also accepts ``temperature=0`` (a common way to ask for greedy).
    """
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False; got {do_sample!r}")
    temperature = _real("temperature", temperature, "> 0 (0 allowed only without do_sample)")
    if temperature < 0 or (do_sample and temperature == 0):
        raise ValueError(f"temperature must be > 0 when sampling (0 allowed only without do_sample); got {temperature}")
    if top_k is not None:
        top_k = _int("top_k", top_k, "None or >= 0 (0 and None: no top-k cut)", 0, 2**63 - 1)
    top_p = _real("top_p", top_p, "in (0, 1]")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if seed is not None:
        seed = _int("seed", seed, f"None or in [0, {MAX_SEED}]", 0, MAX_SEED)
    return do_sample, temperature, top_k, top_p, seed


def choose_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    # shift by the row max first (softmax is shift-invariant) and divide in float64: a tiny temperature
    # (1e-300 is 0 in float32) then sends the other entries to -inf instead of turning the best one
    # into 0/0 or inf (nan in softmax)
    x = logits.double()
    scores = (x - x.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
