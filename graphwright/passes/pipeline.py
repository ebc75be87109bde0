"""Run a recipe's passes over a step graph.

Each pass runs on a copy of the graph, so a failing pass leaves the caller's graph intact. This
module stays below codegen and runtime: it never lowers or runs a graph itself. The caller hands
in ``verify_fn`` (``graphwright.verify.Verifier``: probe logits before/after each pass on the
chosen backend) and ``lower_fn`` (for passes that profile by running the graph, e.g. FastGen);
``graphwright.verify.run_recipe`` is the verifying entry point ``compile`` uses.
"""

from __future__ import annotations

import random

import torch

from ..errors import GraphwrightError, RecipeError
from ..recipes import Recipe
from .base import PassContext, instantiate
from .budgets import budget_of, warn_near_zero
from .manager import order_passes

CALIBRATION_TOKENS = 200


def run_recipe(sg, recipe, model=None, tokenizer=None, verify_fn=None, lower_fn=None, extra: dict | None = None):
    """Apply ``recipe`` to ``sg``; returns ``(new_sg, Recipe, verification)``.

    ``verification`` is plain data: ``{"passes": [{"name", "exact", "max_abs_logit_diff", "kl"}, ...]}``;
    ``verify_fn(pass, old_sg, new_sg, exact) -> {"max_abs_logit_diff", "kl", ...}`` fills the numbers (None
    without one) and raises for an exact pass that changed the logits. ``lower_fn(gm) -> callable``
    reaches passes as ``ctx.lower``. Raises ``RecipeError`` for a bad recipe, a pass that does not apply,
    or a setting that keeps no token (``budgets.budget_of``); a near-zero budget adds ``"warning"`` to its
    record and emits a ``BudgetWarning`` carrying the measured deviation.
    """
    parsed = Recipe.parse(recipe)
    passes = instantiate(parsed)  # all argument errors surface before any work is done
    budgets = {id(p): budget_of(p) for p in passes}
    for p in passes:  # so do settings that keep no token (passes/budgets.py)
        if budgets[id(p)].refuse:
            raise RecipeError(f"pass {p.name}: {budgets[id(p)].refuse}")
    if not passes:
        return sg, parsed, {"passes": []}
    plan = order_passes(passes, sg)  # the compiler's order; conflicts surface here, before any surgery
    entries = dict(zip(map(id, passes), parsed.to_list()))
    passes = plan.passes
    ctx = make_context(model, tokenizer, lower_fn)
    ctx.extra.update(extra or {})  # tools from the layers above, e.g. "profile_heads" for duo(retrieval="auto")
    records = []
    for p in passes:
        entry = entries[id(p)]
        reason = p.applies_to(sg)
        if reason:
            raise RecipeError(f"pass {p.name} does not apply to {sg.info.architecture}: {reason}")
        new = p.run(sg.copy(), ctx)
        if new is None:
            raise GraphwrightError(f"pass {p.name} returned None; run() must return the rewritten step graph")
        # a fresh list: copies share the notes dict's values, so never append in place
        new.notes["recipe"] = [*sg.notes.get("recipe", []), entry]
        exact = bool(type(p).exact or p.is_identity())
        record = {"name": p.name, "exact": exact, "max_abs_logit_diff": None, "kl": None}
        if verify_fn is not None:
            record.update(verify_fn(p, sg, new, exact))
        warn_near_zero(p, budgets[id(p)], record)  # a near-zero budget: a BudgetWarning with the measured deviation
        records.append(record)
        sg = new
    sg.notes["pass_order"] = plan.to_dict()
    return sg, parsed, {"passes": records}


def make_context(model, tokenizer, lower_fn=None) -> PassContext:
    """The PassContext: model, tokenizer, ``lower_fn`` and, when there is a tokenizer, 200 calibration tokens."""
    ids = None
    if tokenizer is not None:
        ids = calibration_ids(tokenizer)
        if model is not None:
            try:
                ids = ids.to(next(model.parameters()).device)
            except (StopIteration, AttributeError, TypeError):
                pass
    return PassContext(model=model, tokenizer=tokenizer, calibration_ids=ids, lower=lower_fn)


def calibration_text(n_sentences: int = 60, seed: int = 1234) -> str:
    """A fixed English-like paragraph built in code (no files, no downloads; same text every run).

    Profiling passes (FastGen, head selection) need *some* natural text with varied tokens and
    long-range repeats; which text matters little, that it never changes matters a lot.
    """
    rng = random.Random(seed)
    subjects = ["The old clerk", "A young sailor", "Her elder sister", "The village doctor", "My neighbour",
                "The small committee", "Every traveller", "The careful student", "His cousin", "The river pilot"]
    verbs = ["wrote a long letter to", "walked slowly towards", "spoke quietly with", "waited an hour for",
             "argued at length with", "carried the parcel to", "could not forget", "laughed kindly at"]
    objects = ["the harbour master", "the new rector", "a friend from London", "the family at the mill",
               "the housekeeper", "an officer of the regiment", "the children in the garden", "the baker"]
    tails = ["before the rain began.", "while the bells rang at noon.", "although nobody had asked.",
             "because the road was closed.", "and then returned home for supper.", "on the first day of spring.",
             "as the lamps were lit along the street.", "in the year 1812, or perhaps 1813."]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
                    for _ in range(n_sentences))


def calibration_ids(tokenizer, n_tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """LongTensor [1, n_tokens] of the calibration text (repeated if the tokenizer is very coarse)."""
    text = calibration_text()
    ids: list = []
    while len(ids) < n_tokens:
        chunk = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not chunk:
            raise GraphwrightError("the tokenizer produced no tokens for the calibration text")
        ids += list(chunk)
    return torch.tensor([ids[:n_tokens]], dtype=torch.long)
