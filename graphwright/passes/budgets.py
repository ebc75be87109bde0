"""What a KV-reducing pass keeps, read from its recipe arguments: when it starts to act, and degenerate settings.

Compile-time verification (``graphwright.verify``) runs a probe through prefill and decode steps;
for the measured deviation to mean anything the probe must be longer than what the pass keeps,
so that eviction (or the window, or page selection) really acts. ``budget_of(pass)`` gives:

* ``acts_after``: the smallest context length at which the pass keeps fewer tokens than it sees
  (``None``: unknown, or the pass never drops anything at that setting);
* ``refuse``: a setting that keeps no earlier token at all, so every decode step would attend to
  itself only (``h2o(heavy=0, recent=0)``, ``fastgen(recovery=0)``, ``window(size=1, sinks=0)``);
  ``pipeline.run_recipe`` raises it as ``RecipeError`` before any work;
* ``warn``: a legal but near-zero budget (fewer than ``NEAR_ZERO`` tokens per head of a
  ``NEAR_ZERO_CONTEXT``-token context; FastGen recovery below ``NEAR_ZERO_RECOVERY``):
  ``pipeline.run_recipe`` warns with the deviation verification measured.

Passes not listed here (exact passes, ``lowrank_kv``, ``steer``, ``gemfilter``) have no token budget
the graph probe can exercise: ``Budget()``. ``streaming(window=0)`` and ``snapkv(budget=0)`` are
already refused by their arguments' minimum (1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

NEAR_ZERO = 4  # tokens per head
NEAR_ZERO_CONTEXT = 100  # tokens of context at which fraction budgets are judged
NEAR_ZERO_RECOVERY = 0.1


class BudgetWarning(UserWarning):
    """A legal but near-zero budget; the message carries the deviation verification measured."""


@dataclass(frozen=True)
class Budget:
    acts_after: int | None = None
    refuse: str | None = None
    warn: str | None = None


def _split(x) -> tuple[int, float]:
    """Recipe value -> (count, fraction), as ``eviction_common.frac_or_count``: an int is a count, a float a fraction."""
    if isinstance(x, int) and not isinstance(x, bool):
        return int(x), 0.0
    return 0, float(x)


def first_length_acting(count: int, frac: float, limit: int = 1 << 20) -> int | None:
    """Smallest length L with ``count + floor(frac * L) < L`` (the pass drops a token), None if none up to ``limit``."""
    if frac >= 1.0:
        return None
    guess = max(1, math.floor((count + 1) / (1.0 - frac)) - 2)
    for L in range(guess, min(limit, guess + 1000)):
        if count + math.floor(frac * L + 1e-9) < L:
            return L
    return None


def _token_budget(name: str, call: str, count: int, frac: float) -> Budget:
    kept = count + math.floor(frac * NEAR_ZERO_CONTEXT + 1e-9)
    warn = None
    if frac < 1.0 and kept < NEAR_ZERO:
        warn = (f"{call} keeps about {kept} token(s) per head of a {NEAR_ZERO_CONTEXT}-token context "
                f"(near zero: under {NEAR_ZERO})")
    return Budget(acts_after=first_length_acting(count, frac), warn=warn)


def _h2o(v: dict) -> Budget:
    (hn, hf), (rn, rf) = _split(v["heavy"]), _split(v["recent"])
    call = f"h2o(heavy={v['heavy']!r}, recent={v['recent']!r})"
    if hn + rn == 0 and hf + rf == 0:
        return Budget(refuse=f"{call} keeps no token: every decode step would attend to itself only; "
                             "give heavy and/or recent > 0 (token counts as ints, fractions of the length as floats; "
                             "defaults heavy=0.1, recent=0.1)")
    return _token_budget("h2o", call, hn + rn, hf + rf)


def _fastgen(v: dict) -> Budget:
    if v.get("force") == "full" or (v.get("force") is None and v["recovery"] >= 1.0):
        return Budget()
    if v.get("force") is None and v["recovery"] <= 0:
        return Budget(refuse=f"fastgen(recovery={v['recovery']!r}) gives every head the cheapest policy (special tokens "
                             "only) without looking at its attention: the cache keeps special tokens and nothing else "
                             "(no token at all without a tokenizer); use recovery > 0 (default 0.95; 1.0 = lossless)")
    (ln, lf), (fn, ff) = _split(v["local"]), _split(v["frequent"])
    base = _token_budget("fastgen", f"fastgen(local={v['local']!r}, frequent={v['frequent']!r})", ln + fn, lf + ff)
    warn = base.warn
    if v.get("force") is None and v["recovery"] < NEAR_ZERO_RECOVERY:
        warn = (f"fastgen(recovery={v['recovery']!r}) is near zero (under {NEAR_ZERO_RECOVERY}): most heads get the "
                "special-tokens-only policy")
    elif v.get("force") in ("special", "punct"):
        warn = f"fastgen(force={v['force']!r}) keeps only special/punctuation tokens on every head"
    return Budget(acts_after=base.acts_after, warn=warn)


def _streaming(v: dict) -> Budget:
    """A per-layer window list: the probe must cross the largest window (so every layer evicts); the smallest
    decides the near-zero warning."""
    sinks, w = int(v["sinks"]), v["window"]
    windows = [int(x) for x in w] if isinstance(w, list) else [int(w)]
    call = f"streaming(sinks={sinks}, window={w!r})"
    if sinks + min(windows) <= 0:
        return Budget(refuse=f"{call} keeps no token; window must be >= 1")
    acts = _token_budget("streaming", call, sinks + max(windows), 0.0)
    return Budget(acts_after=acts.acts_after, warn=_token_budget("streaming", call, sinks + min(windows), 0.0).warn)


def _duo(v: dict) -> Budget:
    # its streaming heads keep sinks + window (whether the head set has any is known only when it runs)
    return _token_budget("duo", f"duo(sinks={v['sinks']}, window={v['window']})", int(v["sinks"]) + int(v["window"]), 0.0)


def _snapkv(v: dict) -> Budget:
    return _token_budget("snapkv", f"snapkv(budget={v['budget']})", int(v["budget"]), 0.0)


def _window(v: dict) -> Budget:
    size, sinks = int(v["size"]), int(v["sinks"])
    call = f"window(size={size}, sinks={sinks})"
    if size <= 1 and sinks == 0:
        return Budget(refuse=f"{call} lets every token see only itself (no earlier token); use size >= 2 or sinks >= 1")
    return _token_budget("window", call, size + sinks, 0.0)


def _block_sparse(v: dict) -> Budget:
    keys = int(v["block"]) * int(v["top_k"])
    return _token_budget("block_sparse", f"block_sparse(block={v['block']}, top_k={v['top_k']})", keys, 0.0)


BUDGETS = {"h2o": _h2o, "fastgen": _fastgen, "streaming": _streaming, "duo": _duo, "snapkv": _snapkv, "window": _window,
           "block_sparse": _block_sparse}


def budget_of(p) -> Budget:
    """The ``Budget`` of an instantiated pass (``Budget()`` when its name has no entry in ``BUDGETS``)."""
    fn = BUDGETS.get(p.name)
    if fn is None or p.is_identity():
        return Budget()
    return fn(p.values)


def warn_near_zero(p, budget: Budget, record: dict) -> None:
    """Record and emit a ``BudgetWarning`` for a near-zero budget, with the deviation verification measured (if any)."""
    if budget.warn is None:
        return
    if record.get("max_abs_logit_diff") is None:
        measured = "not measured (verification off)"
    else:
        measured = f"measured on the verification probe: max |dlogit| {record['max_abs_logit_diff']:.3g}, KL {record['kl']:.3g}"
        if record.get("decode_max_abs_logit_diff") is not None:
            measured += (f" (decode steps after eviction: max |dlogit| {record['decode_max_abs_logit_diff']:.3g}, "
                         f"KL {record['decode_kl']:.3g})")
    record["warning"] = f"{budget.warn}; {measured}"
    warnings.warn(f"pass {p.name}: {record['warning']}", BudgetWarning, stacklevel=4)


def budget_reach(recipe) -> dict[str, int]:
    """``{pass name: context length from which it drops tokens}`` for ``recipe``'s passes with a token budget
    (what a verification probe must exceed for eviction to act)."""
    from ..recipes import Recipe
    from .base import instantiate

    out: dict[str, int] = {}
    for p in instantiate(Recipe.parse(recipe)):
        acts = budget_of(p).acts_after
        if acts is not None:
            out[p.name] = max(out.get(p.name, 0), int(acts))
    return out
