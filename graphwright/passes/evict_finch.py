"""What ``evict(score="finch", ...)`` needs and refuses (``ops/scorers/finch.py``: Finch, doi 10.1162/tacl_a_00716).

Finch's observation window is the question, so ``window`` (the question's token count, the prompt's last
tokens) is required, an int >= 1: a default or a fraction would score with the context's own tail. ``chunk=N``
is Finch's chunked selection (a budget share per chunk), so ChunkKV's ``chunk_heads``/``chunk_reuse`` are
refused with it, and so are ``rule='pyramid'``/``'adaptive'`` (their per-layer / per-head budgets are not a
per-chunk share). Invariant tested: each refusal (``tests/passes/test_evict_finch.py``).
"""

from __future__ import annotations

from ..errors import RecipeError

EXAMPLE = "evict(score='finch', budget=0.5, window=len(question_ids))"


def check_finch(v: dict, rule: str) -> None:
    """RecipeError naming the problem and what is allowed, for evict argument values ``v`` with score='finch'."""
    w = v.get("window")
    if w is None:
        raise RecipeError("evict: score='finch' needs window=<the question's length in tokens>: Finch's observation "
                          "window is the question at the end of the prompt (context + question), and it is always kept; "
                          f"e.g. {EXAMPLE}")
    if isinstance(w, float) or isinstance(w, bool) or w < 1:
        raise RecipeError(f"evict: score='finch' takes window as an int >= 1, the question's token count; got window={w!r} "
                          f"(e.g. {EXAMPLE})")
    if v.get("chunk"):
        extra = [k for k in ("chunk_heads", "chunk_reuse") if v.get(k) is not None]
        if extra:
            raise RecipeError(f"evict: score='finch' with chunk= is Finch's chunked selection (each chunk keeps its share "
                              f"of the budget), not ChunkKV; {extra} do not apply; leave them out")
        if rule != "fixed":
            raise RecipeError(f"evict: score='finch' with chunk= takes rule='fixed' (each chunk keeps its share of one "
                              f"budget); got rule={rule!r}")
    elif v.get("chunk_heads") is not None or v.get("chunk_reuse") is not None:
        raise RecipeError("evict: score='finch' does not take chunk_heads= / chunk_reuse= (ChunkKV options); Finch's "
                          "chunked selection is chunk=N alone")
