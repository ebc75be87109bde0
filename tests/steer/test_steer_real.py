"""PASTA on the real smollm2-135m: the exact setting keeps tokens; steering concentrates a head on the span."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.steer.spans import encode_with_emphasis
from graphwright.steer.tasks import make_task
from tests.steer.helpers import probs, record_attention

LAYER, HEAD, ALPHA = 12, 3, 0.01


@pytest.mark.slow
def test_smollm2_identity_and_attention_mass_on_the_span():
    model, tok = gw.load_model("smollm2-135m")
    ex = make_task("json", 1, seed=0).examples[0]
    ids, mask, spans = encode_with_emphasis(tok, ex.prompt, list(ex.emphasis))
    base = gw.compile(model, tokenizer=tok)
    ref = base.generate(ids, max_new_tokens=8)

    exact = gw.compile(model, recipe="steer(alpha=1.0, heads='all')", tokenizer=tok)
    assert torch.equal(exact.generate(ids, max_new_tokens=8, emphasis=spans[0]), ref)

    cm = gw.compile(model, recipe=f"steer(alpha={ALPHA}, heads={{{LAYER}: [{HEAD}]}})", tokenizer=tok, backend="reference")
    with record_attention(cm) as calls:
        cm.logits(ids, emphasis=spans[0])
    call = next(c for c in calls if c["layer"] == LAYER)  # earlier layers are unsteered: same q, k as the base
    (s, e), = spans[0]
    last = slice(-1, None)
    steered, unsteered = probs(call)[0, :, last], probs(call, bias=False)[0, :, last]  # [H, 1, S]
    m = unsteered[HEAD, 0, s:e].sum().item()
    got = steered[HEAD, 0, s:e].sum().item()
    # PASTA's closed form for the mass on the emphasized span: m / (m + alpha (1 - m))
    assert got == pytest.approx(m / (m + ALPHA * (1 - m)), abs=1e-4)
    assert got / m > 2 and got > 0.5, (m, got)
    others = [h for h in range(unsteered.shape[0]) if h != HEAD]
    assert torch.equal(steered[others], unsteered[others])
