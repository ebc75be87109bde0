"""ONNX Runtime prompts run in chunks over the dense cache (``onnx_model.prompt_chunking``).

Tiny Llama identity export, batch 2 left-padded (one row mostly padding, so a chunk can be all padding for it):
a prompt run as steps of 4 or 5 tokens gives the one-step prompt's logits at every position (1e-5) and cache,
and the same greedy tokens; ``"auto"`` picks ``PROMPT_CHUNK`` for the dense artifact and one step, with the
reason, for an artifact that evicts in its prompt step, where an explicit chunk is refused; bad values are
refused with what is allowed.
"""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.errors import GraphwrightError
from graphwright.onnx_model import PROMPT_CHUNK
from tests.conftest import left_padded_batch

LENGTHS = [17, 3]


@pytest.fixture(scope="module")
def dense(onnx_artifact):
    return onnx_artifact("tiny-llama", "identity")


def test_auto_chunks_a_dense_artifact(dense):
    _, folder = dense
    om = gw.load(folder)
    assert om.prompt_chunk == PROMPT_CHUNK and "dense cache" in om.prompt_chunk_reason
    assert gw.load(folder, prompt_chunk=None).prompt_chunk is None


@pytest.mark.parametrize("chunk", [4, 5])
def test_chunked_prompt_equals_one_step(dense, chunk):
    cm, folder = dense
    one, part = gw.load(folder, prompt_chunk=None), gw.load(folder, prompt_chunk=chunk)
    assert part.prompt_chunk == chunk
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=5)
    a, b = one.logits(ids, attention_mask=mask), part.logits(ids, attention_mask=mask)
    assert a.shape == b.shape == (2, max(LENGTHS), cm.step_graph.info.vocab_size)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() < 1e-5
    assert one.last_stats["kv_bytes"] == part.last_stats["kv_bytes"]
    ta = one.generate(ids, attention_mask=mask, max_new_tokens=12)
    tb = part.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(ta, tb)
    # and the torch runtime's tokens (the artifact's own reference)
    assert torch.equal(tb, cm.generate(ids, attention_mask=mask, max_new_tokens=12))


def test_evicting_prompt_keeps_one_step(onnx_artifact):
    _, folder = onnx_artifact("tiny-llama", "fastgen(recovery=0.9)")
    om = gw.load(folder)
    assert om.prompt_chunk is None and om.prompt_chunk_reason.startswith("one prompt step: ")
    with pytest.raises(GraphwrightError, match="not exact for this artifact"):
        gw.load(folder, prompt_chunk=8)


@pytest.mark.parametrize("bad", [1, 0, True, 2.5, "512"])
def test_bad_chunk_refused(dense, bad):
    with pytest.raises(GraphwrightError, match="prompt_chunk must be 'auto', None or an int >= 2"):
        gw.load(dense[1], prompt_chunk=bad)
