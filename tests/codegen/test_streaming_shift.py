"""StreamingLLM on the torch backend without per-step key rotation (``codegen/torch/streaming_shift.py``).

The torch backend caches keys rotated at their absolute positions and rotates only the query (back by
the number of evicted tokens, for the sinks). Against the torch backend with the compacting references
and the step graph's pre-RoPE cache (no ``streaming_rope_shift``): same kept sets after every step,
same greedy tokens, logits within 1e-4, over hundreds of decode steps on a ragged left-padded batch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graphwright.codegen.backends import EVICTION_REFERENCES, TORCH
from graphwright.codegen.torch.streaming_shift import streaming_attention, streaming_rope_shift
from graphwright.compiled import CompiledModel
from graphwright.ops.rope_index_ref import _rotate, rope_angles
from graphwright.passes.base import PassContext
from graphwright.passes.streaming import Streaming
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, state_of
from tests.passes.streaming_cases import reference_layer, unordered_slot_case

# the definition: pre-RoPE cache, rope_cache_index and the compacting eviction references at every step
REFERENCE = dataclasses.replace(TORCH, name="torch_reference_streaming", table={**TORCH.table, **EVICTION_REFERENCES},
                                transforms=tuple(t for t in TORCH.transforms if t is not streaming_rope_shift))
LENGTHS = [12, 7]  # batch 2, row 1 left-padded by 5


def kept(cm, state, layers=2):
    return [[[sorted(h) for h in row] for row in kept_positions(state_of(cm, state, f"key_positions{layer}"))]
            for layer in range(layers)]


@pytest.mark.parametrize("model, steps", [("tiny-llama", 240), ("tiny-qwen2", 120), ("tiny-gemma3", 120)])
def test_shifted_query_keeps_the_reference_sets_and_logits(compiled_tiny, model, steps):
    sg = Streaming(sinks=2, window=5).run(compiled_tiny(model).step_graph.copy(), PassContext())
    fast, ref = CompiledModel(sg, backend="torch"), CompiledModel(sg, backend=REFERENCE)
    code = fast.lowered_code()
    assert code.count("streaming_attention(") == 2 and "rope_cache_index" not in code and "rope_invert" not in code
    assert "rope_cache_index" in ref.lowered_code()
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    sets = {"fast": [], "ref": []}
    got, got_toks, _ = decode_loop(fast, ids, mask, steps, lambda i, s: sets["fast"].append(kept(fast, s)))
    want, want_toks, _ = decode_loop(ref, ids, mask, steps, lambda i, s: sets["ref"].append(kept(ref, s)))
    assert sets["fast"] == sets["ref"]
    assert sets["fast"][-1][1][0][0] == [0, 1] + list(range(steps + 7, steps + 12))  # evicts at every step
    assert torch.equal(got_toks, want_toks)
    assert (got - want).abs().max() <= 1e-4


def test_the_cache_holds_keys_rotated_at_their_positions(compiled_tiny):
    """The torch state's keys are the reference's pre-RoPE keys rotated at each slot's own position."""
    sg = Streaming(sinks=2, window=5).run(compiled_tiny("tiny-llama").step_graph.copy(), PassContext())
    fast, ref = CompiledModel(sg, backend="torch"), CompiledModel(sg, backend=REFERENCE)
    ids, mask = left_padded_batch(256, LENGTHS, seed=2)
    _, _, s_fast = decode_loop(fast, ids, mask, 30)
    _, _, s_ref = decode_loop(ref, ids, mask, 30)
    node = next(n for n in fast._lowered.graph.nodes if n.target is streaming_attention)
    inv = _attr(fast._lowered, node.args[10].target)  # the layer's rotary table (a get_attr node)
    kp_f, kp_r = state_of(fast, s_fast, "key_positions0"), state_of(ref, s_ref, "key_positions0")
    k_f, k_r = state_of(fast, s_fast, "k0"), state_of(ref, s_ref, "k0")
    for b in range(2):
        for h in range(kp_f.shape[1]):
            of, orf = kp_f[b, h].argsort(), kp_r[b, h].argsort()
            of, orf = of[kp_f[b, h, of] >= 0], orf[kp_r[b, h, orf] >= 0]
            pos = kp_f[b, h, of]
            assert torch.equal(pos, kp_r[b, h, orf]) and len(pos) == 7
            cos, sin = rope_angles(pos, inv)
            rotated = _rotate(k_r[b, h, orf][None, None], cos, sin, 1.0)[0, 0]
            assert (k_f[b, h, of] - rotated).abs().max() <= 1e-5


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("evicted", [0, 1, 37, 500])
def test_streaming_attention_op_equals_rotation_by_cache_index(evicted):
    """Op level: unordered slots (sinks + a window of consecutive positions + empty slots), 2 rows, GQA 4:2."""
    sinks, window = 3, 6
    q_abs, k_abs, v, q_pos, k_pos, inv = unordered_slot_case(evicted, sinks, window)
    got = streaming_attention(q_abs, k_abs, v, q_pos, k_pos, 0.25, 0, None, 0, q_pos, inv, 1.0, sinks, window)
    want = reference_layer(q_abs, k_abs, v, q_pos, k_pos, 0.25, inv)
    assert (got - want).abs().max() <= 1e-4
