"""Run a recipe's passes over a step graph, verifying each one on a probe input.

Each pass runs on a copy of the graph, so a failing pass leaves the caller's graph intact.
Verification compares the logits of the graph before and after every pass on a small seeded
probe (two rows, one left-padded, so padding handling is exercised too): an exact pass that
moves the logits is a bug and raises; a lossy pass gets its measured deviation recorded.
"""

from __future__ import annotations

import random

import torch

from ..codegen.lower import lower
from ..errors import GraphwrightError, RecipeError
from ..recipes import Recipe
from ..runtime import positions_from_mask
from .base import PassContext
from .manager import order_passes

PROBE_BATCH, PROBE_LEN, PROBE_PAD, PROBE_SEED = 2, 16, 3, 0
CALIBRATION_TOKENS = 200
EXACT_TOL = {torch.float32: 1e-4, torch.float64: 1e-4}  # any other dtype (fp16, bf16): LOW_PRECISION_TOL
LOW_PRECISION_TOL = 1e-2


def run_recipe(sg, recipe, model=None, tokenizer=None, verify: bool = True):
    """Apply ``recipe`` to ``sg``; returns ``(new_sg, Recipe, verification)``.

    ``verification`` is plain data: ``{"passes": [{"name", "exact", "max_abs_logit_diff", "kl"}, ...]}``
    (diff and KL are None when ``verify`` is False). Raises ``RecipeError`` for a bad recipe or a
    pass that does not apply, ``GraphwrightError`` for an exact pass that changed the logits.
    """
    parsed = Recipe.parse(recipe)
    passes = parsed.instantiate()  # all argument errors surface before any work is done
    if not passes:
        return sg, parsed, {"passes": []}
    plan = order_passes(passes, sg)  # the compiler's order; conflicts surface here, before any surgery
    entries = dict(zip(map(id, passes), parsed.to_list()))
    passes = plan.passes
    ctx = make_context(model, tokenizer)
    probe = make_probe(sg) if verify else None
    before = probe_logits(sg, probe) if verify else None
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
        if verify:
            after = probe_logits(new, probe)
            record.update(compare(before, after, probe[1]))
            tol = EXACT_TOL.get(sg.info.dtype, LOW_PRECISION_TOL)
            diff = record["max_abs_logit_diff"]
            if exact and not diff <= tol:  # `not <=` so that NaN fails too
                raise GraphwrightError(f"pass {p.name} is exact but changed the probe logits by {diff:.3g} "
                                       f"(tolerance {tol:g} for {str(sg.info.dtype).replace('torch.', '')})")
            before = after
        records.append(record)
        sg = new
    sg.notes["pass_order"] = plan.to_dict()
    return sg, parsed, {"passes": records}


def make_probe(sg):
    """Seeded ``(input_ids, attention_mask)`` [2, 16]; row 1 left-padded by 3; ids in [3, vocab)."""
    vocab = sg.info.vocab_size
    g = torch.Generator().manual_seed(PROBE_SEED)
    ids = torch.randint(min(3, vocab - 1), vocab, (PROBE_BATCH, PROBE_LEN), generator=g)
    mask = torch.ones(PROBE_BATCH, PROBE_LEN, dtype=torch.long)
    mask[1, :PROBE_PAD] = 0
    pad = sg.info.pad_token_id if sg.info.pad_token_id is not None else 0
    return ids.masked_fill(mask == 0, pad), mask


def _device(gm) -> torch.device:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def probe_logits(sg, probe) -> torch.Tensor:
    """fp32 logits [B, T, V] of ``sg`` on the probe, run through the torch backend."""
    ids, mask = probe
    device = _device(sg.gm)
    ids, mask = ids.to(device), mask.to(device)
    lowered = lower(sg.gm, "torch")
    out = lowered(ids, positions_from_mask(mask), torch.arange(ids.shape[1], device=device), *sg.init_state(ids.shape[0], device))
    return out[0].float().cpu()


def compare(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> dict:
    """Max abs logit difference and mean KL(before || after) over real (unpadded) tokens."""
    real = mask.bool()
    b, a = before[real], after[real]
    diff = (b - a).abs().max().item()
    lb, la = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    kl = (lb.exp() * (lb - la)).sum(-1).mean().item()
    return {"max_abs_logit_diff": diff, "kl": max(kl, 0.0) if kl == kl else kl}  # clamp float round-off below 0


def make_context(model, tokenizer) -> PassContext:
    """The PassContext: model, tokenizer and, when there is a tokenizer, 200 calibration tokens."""
    ids = None
    if tokenizer is not None:
        ids = calibration_ids(tokenizer)
        if model is not None:
            try:
                ids = ids.to(next(model.parameters()).device)
            except (StopIteration, AttributeError, TypeError):
                pass
    return PassContext(model=model, tokenizer=tokenizer, calibration_ids=ids)


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
