"""The probe export verification runs: long enough to cross what acts only on long contexts.

A 7-token probe never reaches a sliding window, an eviction budget, a sparse block or a page
boundary, so an artifact that broke any of them would verify (issue 22 item 4). The probe's
longer row is ``reach + PAD + MARGIN`` tokens, where ``reach`` is the largest of: every attention
node's window (native sliding layers and the ``window`` pass) and the length from which each
recipe pass starts to drop tokens (``passes.budgets``: eviction budgets, ``block_sparse``'s
selected blocks). It is capped at ``MAX_PROBE`` tokens so export stays quick; what the cap leaves
uncrossed is recorded in the verification (``probe.uncrossed``), never hidden. A reach beyond the
cap does not stretch the probe to the cap: a 512-token prompt that crosses nothing checks no more
than a short one and cost ~15 CPU s of torch-side verification per export on SmolLM2, so such a
probe is ``UNCROSSED_PROBE`` tokens (or the longest crossable reach, if longer).
"""

from __future__ import annotations

import torch

from ...ops import schema
from ...passes.budgets import budget_reach

MIN_PROBE = 7  # the probe's longer row without anything to cross (the second row is PAD shorter)
PAD = 3  # left padding of the second row
MARGIN = 4  # tokens past the largest reach, so decode steps run beyond it too
MAX_PROBE = 512  # tokens: ~1 s of prefill per side for SmolLM2 on 2 CPU cores
UNCROSSED_PROBE = 64  # the longer row when a reach lies beyond the cap (a longer probe would cross nothing more)


def reaches(sg, recipe) -> dict[str, int]:
    """What the probe must cross: ``{"window": w, "<pass>": acts_after}`` (zero-free)."""
    out = {}
    windows = [int(schema.get(n, "window", 0) or 0) for n in schema.attention_nodes(sg.gm)]
    if max(windows, default=0) > 0:
        out["window"] = max(windows)
    return {**out, **budget_reach(recipe)}


def probe_lengths(sg, recipe, max_tokens: int = MAX_PROBE) -> tuple[tuple[int, int], dict]:
    """Prompt lengths (longer row, padded row) and the record of what they cross."""
    reach = reaches(sg, recipe)
    need = {k: r + PAD + MARGIN for k, r in reach.items()}
    longest = max([MIN_PROBE] + [n for n in need.values() if n <= max_tokens])
    if any(n > max_tokens for n in need.values()):  # something the cap cannot cross: a plain long-ish probe, no more
        longest = max(longest, min(UNCROSSED_PROBE, max_tokens))
    crossed = {k: v for k, v in reach.items() if v < longest - PAD}
    uncrossed = {k: v for k, v in reach.items() if k not in crossed}
    return (longest, longest - PAD), {"crossed": crossed, "uncrossed": uncrossed, "max_tokens": max_tokens}


def probe(vocab: int, lengths=(MIN_PROBE, MIN_PROBE - PAD), seed: int = 0):
    """A left-padded batch of 2 prompts (ids avoid the low special ids)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(min(3, vocab - 1), vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask
