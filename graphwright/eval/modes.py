"""Which perplexity mode shows what a compiled recipe does: read from the passes' declared facts.

A pass that changes what the KV cache holds (an eviction policy, a sliding window, block-sparse
page selection, a low-rank latent cache) acts on the tokens a decode step reads, while window-mode
perplexity scores every token from one prefill over the window, where such a pass may never act
(``h2o`` prefills densely and evicts afterwards). So ``default_ppl_mode`` picks ``"stream"``
(prefill, then one decode step per scored token) whenever any pass of the compiled recipe
*produces* one of ``CACHE_FACTS`` (the pass manager's fact vocabulary,
``graphwright.passes.manager.FACTS``), and ``"window"`` otherwise. It reads the pass classes the
recipe instantiates, never the recipe's text.
"""

from __future__ import annotations

CACHE_FACTS = frozenset({"evicted", "window", "block_sparse", "latent_cache", "channel_pruned"})


def cache_rewrites(cm) -> list:
    """``[(pass name, sorted facts it produces that change the cache)]`` for the compiled model's recipe."""
    from ..passes.base import instantiate
    from ..recipes import Recipe

    recipe = getattr(cm, "recipe", None)
    if recipe is None:
        return []
    out = []
    for p in instantiate(Recipe.parse(recipe)):
        facts = sorted(set(p.produces) & CACHE_FACTS)
        if facts:
            out.append((p.name, facts))
    return out


def default_ppl_mode(cm) -> tuple:
    """``(mode, reason)``: ``"stream"`` when a pass changes what the cache holds, else ``"window"``."""
    acts = cache_rewrites(cm)
    if acts:
        why = "; ".join(f"{name} produces {', '.join(facts)}" for name, facts in acts)
        return "stream", f"{why}: scored through decode steps so the rewrite acts on the scored tokens"
    return "window", "no pass changes what the KV cache holds: window mode (one prefill per window) scores the same"
