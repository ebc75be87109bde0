"""A compressed context reused for several questions (issue 20 item 2): ``cm.prefill`` once, then
``cm.generate(question, context=ctx)``; the context is never modified, survives save/load, and runs in ONNX
Runtime too."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.runtime.score import stream_logits
from tests.conftest import left_padded_batch

GEN = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0)


def _prompt(seed, lengths=(24, 19)):
    return left_padded_batch(256, list(lengths), seed=seed)


def _questions(n, rows=2, length=5):
    g = torch.Generator().manual_seed(50)
    return [torch.randint(3, 256, (rows, length), generator=g) for _ in range(n)]


def test_lossless_context_answers_like_the_whole_prompt(tiny):
    cm = gw.compile(tiny("tiny-llama"))
    ids, mask = _prompt(1)
    ctx = cm.prefill(ids, mask)
    for q in _questions(2):
        whole = cm.generate(torch.cat([ids, q], 1), attention_mask=torch.cat([mask, torch.ones_like(q)], 1), **GEN)
        got = cm.generate(q, context=ctx, **GEN)
        assert torch.equal(got, whole[:, ids.shape[1]:])
    assert cm.last_stats["context_tokens"] == int(mask.sum()) and cm.last_stats["prompt_tokens"] == int(mask.sum()) + 10


@pytest.mark.parametrize("recipe", ["snapkv(budget=8, window=4)", "h2o(heavy=4, recent=4)", "streaming(sinks=2, window=6)"])
def test_compressed_context_is_reused_unchanged_in_any_order(tiny, recipe):
    cm = gw.compile(tiny("tiny-llama"), recipe=recipe, verify=False)
    ids, mask = _prompt(2)
    ctx = cm.prefill(ids, mask)
    assert ctx.kv_bytes < cm.last_stats["kv_bytes_dense"]  # compressed once, at prefill
    before = [t.clone() for t in ctx.state]
    qs = _questions(3)
    first = [cm.generate(q, context=ctx, **GEN) for q in qs]
    again = [cm.generate(q, context=ctx, **GEN) for q in reversed(qs)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.state))  # the context was not touched
    # the definition: compress the context at prefill, then feed the question through decode steps
    q = qs[0]
    full = torch.cat([ids, q], 1)
    ref, _ = stream_logits(cm._step, cm.runtime_graph.state, full, torch.cat([mask, torch.ones_like(q)], 1), prefill=ids.shape[1])
    assert torch.equal(first[0][:, q.shape[1]], ref[:, -1].argmax(-1))


def test_save_load_round_trip_and_foreign_contexts_are_refused(tiny, tmp_path):
    cm = gw.compile(tiny("tiny-llama"), recipe="snapkv(budget=8, window=4)", verify=False)
    ids, mask = _prompt(3)
    ctx = cm.prefill(ids, mask)
    path = ctx.save(tmp_path / "ctx.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ctx.save(path)
    loaded = gw.Context.load(path)
    q = _questions(1)[0]
    assert torch.equal(cm.generate(q, context=loaded, **GEN), cm.generate(q, context=ctx, **GEN))
    other = gw.compile(tiny("tiny-llama"), recipe="snapkv(budget=10, window=4)", verify=False)
    with pytest.raises(ValueError, match=r"made for another model or recipe: recipe is 'snapkv\(budget=8"):
        other.generate(q, context=loaded, **GEN)
    with pytest.raises(ValueError, match="the context has 2 row"):
        cm.generate(q[:1], context=ctx, **GEN)
    with pytest.raises(ValueError, match="cannot be padded"):
        cm.generate(q, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), context=ctx, **GEN)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="not a readable safetensors context"):
        gw.Context.load(tmp_path / "bad.safetensors")


def test_onnx_runtime_answers_from_a_context(tiny, tmp_path):
    cm = gw.compile(tiny("tiny-llama"), recipe="h2o(heavy=4, recent=4)")
    m = gw.load(gw.export_onnx(cm, tmp_path / "a"))
    ids, mask = _prompt(4)
    ctx = m.prefill(ids, mask)
    qs = _questions(2)
    got = [m.generate(q, context=ctx, **GEN) for q in qs]
    assert [torch.equal(g, m.generate(q, context=ctx, **GEN)) for g, q in zip(got, qs)] == [True, True]
    assert [torch.equal(g, cm.generate(q, context=cm.prefill(ids, mask), **GEN)) for g, q in zip(got, qs)] == [True, True]
