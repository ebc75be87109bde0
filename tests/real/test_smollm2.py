"""The real model: SmolLM2-135M-Instruct from its GGUF, exact against Hugging Face."""

import functools
import time

import pytest
import torch

import graphwright as gw
from graphwright.capture.ops import ATTENTION, MOE_EXPERTS

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "def fibonacci(n):"]


@functools.lru_cache(maxsize=None)
def _smol():
    model, tok = gw.load_model("smollm2-135m")
    return model, tok, gw.compile(model, tokenizer=tok)


def test_loads_fast_from_cache():
    gw.load_model("smollm2-135m")  # converts once if needed
    t = time.perf_counter()
    model, tok = gw.load_model("smollm2-135m")
    assert time.perf_counter() - t < 10  # ~1-3 s here; generous for slow CI machines
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert tok("Hello").input_ids


def test_graph_has_one_attention_node_per_layer():
    _, _, cm = _smol()
    nodes = cm.step_graph.nodes(ATTENTION)
    assert len(nodes) == 30 and sorted(n.meta["graphwright"]["layer"] for n in nodes) == list(range(30))


def test_logits_and_greedy_tokens_match_hf():
    model, tok, cm = _smol()
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    pid = (enc.attention_mask.cumsum(1) - 1).clamp(min=0)
    want = model(**enc, position_ids=pid).logits
    got = cm.logits(enc.input_ids, enc.attention_mask)
    real = enc.attention_mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4
    one = tok(PROMPTS[1:2], return_tensors="pt")
    for ids, mask in [(one.input_ids, one.attention_mask), (enc.input_ids, enc.attention_mask)]:
        # both stop at the model's EOS (<|im_end|>); these prompts run the full 64 tokens
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
        ours = cm.generate(ids, attention_mask=mask, max_new_tokens=64)
        assert ours.shape[1] == ids.shape[1] + 64
        assert torch.equal(hf, ours)
    assert "Paris" in tok.decode(ours[0])


def test_upcycled_moe_equals_dense():
    model, tok, _ = _smol()
    moe, _ = gw.load_model("smollm2-135m-moe")
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    assert (moe(ids).logits - model(ids).logits).abs().max().item() < 1e-3
    cm = gw.compile(moe, tokenizer=tok)
    assert len(cm.step_graph.nodes(MOE_EXPERTS)) == 30
    assert (cm.logits(ids) - moe(ids).logits).abs().max().item() <= 1e-4
    assert torch.equal(cm.generate(ids, max_new_tokens=16), moe.generate(ids, max_new_tokens=16, do_sample=False))
