"""StreamingLLM on the compiled backend without re-rotating the cache (``codegen/torch/streaming_shift.py``).

The compiled backend lowers with the torch backend's ``streaming_rope_shift``: keys are cached rotated at
their absolute positions in the static slot buffers (``static_eviction.py``) and each decode step rotates
only the query (back by the number of evicted tokens, for the sinks). Invariant checked against the
definition (``eviction_helpers.COMPACTING``: pre-RoPE cache, ``rope_cache_index`` by cache index and the
compacting references): same kept position set per (row, layer, KV head) after every step, same greedy
tokens, logits within 1e-4, over hundreds of decode steps on a ragged left-padded batch; the decode graph
holds no ``rope_cache_index`` / ``rope_invert`` / per-step key rotation; one compile for every step.
Gemma 3's local layers (a native sliding window on the attention) take ``streaming_attention``'s
rotate-by-rank path, which on static slots must find the new token in its head's first empty slot
(``static_eviction.streaming_attention_static``).
The decode graph runs eagerly by default (``compiler = lambda gm: gm``); under Inductor the case is ``slow``.
"""

from __future__ import annotations

import pytest
import torch

from graphwright.codegen.torch.static_eviction import rope_cache_index_static, streaming_attention_static, streaming_static
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction import ROPE_CACHE_INDEX, ROPE_INVERT
from graphwright.passes.base import PassContext
from graphwright.passes.streaming import Streaming
from tests.codegen.test_streaming_shift import LENGTHS
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, decode_loop, kept_sets


def _decode_targets(cm):
    return [n.target for n in cm._backend_step._decode_graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("model, steps, inductor", [
    ("tiny-llama", 240, False), ("tiny-qwen2", 120, False), ("tiny-gemma3", 120, False),
    pytest.param("tiny-llama", 60, True, marks=pytest.mark.slow)], ids=["llama", "qwen2", "gemma3", "llama-inductor"])
def test_compiled_streaming_without_rerotation_equals_the_compacting_reference(compiled_tiny, model, steps, inductor):
    sg = Streaming(sinks=2, window=5).run(compiled_tiny(model).step_graph.copy(), PassContext())
    cm, ref = CompiledModel(sg, backend="compiled"), CompiledModel(sg, backend=COMPACTING)
    if not inductor:
        cm._backend_step.compiler = lambda gm: gm
    targets = _decode_targets(cm)
    assert targets.count(streaming_attention_static) == 2 and targets.count(streaming_static) == 2
    assert not {ROPE_CACHE_INDEX, ROPE_INVERT, rope_cache_index_static} & set(targets)  # no key is rotated at decode
    assert "rope_cache_index" in ref.lowered_code()
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    sets = {"compiled": [], "ref": []}
    shapes = []

    def on_step(i, s):
        sets["compiled"].append(kept_sets(cm, s))
        shapes.append([tuple(t.shape) for t in s])

    frames = torch._dynamo.utils.counters["frames"]["ok"]
    got, got_toks, _ = decode_loop(cm, ids, mask, steps, on_step)
    frames = torch._dynamo.utils.counters["frames"]["ok"] - frames
    want, want_toks, _ = decode_loop(ref, ids, mask, steps, lambda i, s: sets["ref"].append(kept_sets(ref, s)))
    assert sets["compiled"] == sets["ref"]
    assert sets["compiled"][-1][1][0][0] == [0, 1] + list(range(steps + 7, steps + 12))  # evicts at every step
    assert torch.equal(got_toks, want_toks)
    assert (got - want).abs().max() <= 1e-4
    assert all(s == shapes[1] for s in shapes[1:]) and shapes[1][0][2] == 2 + 5 + 1  # budget + 1 slots, constant
    assert [c["capacity"] for c in cm._backend_step.compiles] == [8] and frames == (1 if inductor else 0)


def test_compiled_streaming_generates_the_torch_backends_tokens(compiled_tiny):
    """Through ``generate`` (the runtime's prefill + decode), the same tokens as ``backend="torch"``, which
    caches the same post-RoPE keys."""
    sg = Streaming(sinks=2, window=5).run(compiled_tiny("tiny-llama").step_graph.copy(), PassContext())
    cm, ref = CompiledModel(sg, backend="compiled"), CompiledModel(sg, backend="torch")
    cm._backend_step.compiler = lambda gm: gm
    ids, mask = left_padded_batch(256, LENGTHS, seed=3)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=40),
                       ref.generate(ids, attention_mask=mask, max_new_tokens=40))
