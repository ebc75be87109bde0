"""Held-out accuracy of steering head sets, side by side with the unsteered model (PASTA Table 1 style).

``compare_head_sets(cm, task, {"profiled": heads, "random": ...})`` runs the task once unsteered
and once per head set on one all-heads-steerable graph (``profile.steerable``), so every row is
measured on the same examples, prompts and decoding. ``random_heads`` draws a seeded head set of
a given size: the control that shows profiling (not just *any* steering) is what helps.
"""

from __future__ import annotations

import random

from .profile import run_task, steerable


def random_heads(num_layers: int, num_heads: int, size: int, seed: int = 0) -> dict:
    """``{layer: [heads]}`` with ``size`` distinct heads drawn uniformly from all L x H heads."""
    if not 0 < size <= num_layers * num_heads:
        raise ValueError(f"a random head set needs 1..{num_layers * num_heads} heads; got {size}")
    picks = random.Random(seed).sample(range(num_layers * num_heads), size)
    out: dict = {}
    for i in sorted(picks):
        out.setdefault(i // num_heads, []).append(i % num_heads)
    return out


def head_count(heads: dict) -> int:
    return sum(len(v) for v in heads.values())


def compare_head_sets(model_or_cm, task, head_sets: dict, alpha: float = 0.01, max_new_tokens: int = 48,
                      batch_size: int = 8, chat: bool = True, tokenizer=None, keep_generations: int = 3) -> list:
    """One row per configuration: ``{"config", "heads", scores...}``, the unsteered row first."""
    cm = steerable(model_or_cm, tokenizer)
    kw = dict(alpha=alpha, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat)
    rows = []
    for name, heads in [("unsteered", None), *head_sets.items()]:
        scores, gens = run_task(cm, task, heads, **kw)
        rows.append({"config": name, "heads": head_count(heads) if heads else 0, **scores,
                     "examples": len(task.examples), "samples": gens[:keep_generations]})
    return rows
