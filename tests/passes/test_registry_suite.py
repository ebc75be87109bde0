"""Registry-driven suite: every registered pass, and every pair of them, on the tiny models.

For every pass (from ``PASS_REGISTRY``, so a new pass is covered without editing this file):
it declares examples; its exact setting gives the dense model's logits (1e-4) and greedy tokens;
its lossy setting generates; the first token after a dense prefill equals dense where the pass
promises it. For every pair, in both written orders: the pass manager gives one order and the
same graph (identical logits), exact settings compose to identity, lossy settings generate, or the
pair is refused with a ``RecipeError`` that names both passes -- never any other error.
"""

from __future__ import annotations

import functools

import pytest
import torch

import graphwright as gw
from graphwright import RecipeError
from tests.conftest import _tiny
from tests.passes.registry_examples import cases, examples, pair_model, pairs, prompt, registered

NEW = 8
GEN = dict(max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)


@functools.lru_cache(maxsize=None)
def dense(model_name: str):
    """(logits, tokens) of the identity-compiled model on the suite's prompt."""
    cm = gw.compile(_tiny(model_name))
    ids, mask = prompt()
    return cm.logits(ids, attention_mask=mask), cm.generate(ids, attention_mask=mask, **GEN)


def run(model_name: str, recipe: str):
    cm = gw.compile(_tiny(model_name), recipe=recipe)
    ids, mask = prompt()
    return cm, cm.logits(ids, attention_mask=mask), cm.generate(ids, attention_mask=mask, **GEN)


@pytest.mark.parametrize("name", registered())
def test_every_registered_pass_declares_examples(name):
    ex = examples(name)
    assert ex.get("models"), f"pass {name} declares no example models (Pass.examples)"
    assert ex.get("exact") or ex.get("lossy"), f"pass {name} declares neither an exact nor a lossy example"
    assert set(ex) <= {"exact", "lossy", "models", "first_token_dense"}, set(ex)


@pytest.mark.parametrize("name,model,recipe", cases("exact"))
def test_exact_setting_is_identity(name, model, recipe):
    cm, logits, tokens = run(model, recipe)
    want_logits, want_tokens = dense(model)
    real = prompt()[1].bool()
    assert (logits[real] - want_logits[real]).abs().max().item() <= 1e-4
    assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("name,model,recipe", cases("lossy"))
def test_lossy_setting_generates(name, model, recipe):
    cm, logits, tokens = run(model, recipe)
    ids = prompt()[0]
    assert tokens.shape == (2, ids.shape[1] + NEW)
    assert torch.equal(tokens[:, :ids.shape[1]], ids)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 256
    assert torch.isfinite(logits[prompt()[1].bool()]).all()
    if examples(name).get("first_token_dense"):
        assert torch.equal(tokens[:, ids.shape[1]], dense(model)[1][:, ids.shape[1]])


def _pair_or_refusal(model, recipe, a, b):
    """Compile ``recipe``; a refusal must be a RecipeError naming both passes (or the model's lack)."""
    try:
        return run(model, recipe)
    except RecipeError as exc:
        msg = str(exc)
        assert (a in msg and b in msg) or "needs" in msg or "does not apply" in msg, msg
        return exc


@pytest.mark.parametrize("a,b", pairs())
def test_pair_composes_in_either_order(a, b):
    model = pair_model(a, b)
    for kind in ("exact", "lossy"):
        ra, rb = examples(a).get(kind) or examples(a).get("lossy"), examples(b).get(kind) or examples(b).get("lossy")
        first = _pair_or_refusal(model, f"{ra} + {rb}", a, b)
        second = _pair_or_refusal(model, f"{rb} + {ra}", a, b)
        if isinstance(first, RecipeError):
            assert isinstance(second, RecipeError) and str(first) == str(second)
            return
        (cm1, l1, t1), (cm2, l2, t2) = first, second
        assert cm1.step_graph.notes["pass_order"]["order"] == cm2.step_graph.notes["pass_order"]["order"]
        assert torch.equal(l1, l2) and torch.equal(t1, t2), "the written order changed the compiled model"
        exact_pair = kind == "exact" and examples(a).get("exact") and examples(b).get("exact")
        if exact_pair:
            want_logits, want_tokens = dense(model)
            real = prompt()[1].bool()
            assert (l1[real] - want_logits[real]).abs().max().item() <= 1e-4
            assert torch.equal(t1, want_tokens)
