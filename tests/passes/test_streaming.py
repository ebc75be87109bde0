"""streaming: exact when everything fits, sinks + window kept, cache indices bounded past the context."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops.eviction_ref import streaming_reference
from graphwright.passes.streaming import Streaming
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import assert_exact_setting, decode_loop, kept_positions, op_decode_loop, run_pass, state_of

LENGTHS = [12, 7]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_window_covering_everything_is_identity(compiled_tiny, name):
    cm = compiled_tiny(name)
    assert_exact_setting(cm, Streaming(sinks=4, window=60), 32, LENGTHS)


def test_sinks_and_window_in_the_model(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=3)
    ev = run_pass(cm, Streaming(sinks=2, window=5))
    logits, _, state = decode_loop(ev, ids, mask, 20)
    assert torch.isfinite(logits).all()
    for layer in range(2):
        kp = kept_positions(state_of(ev, state, f"key_positions{layer}"))
        assert kp == [[[0, 1] + list(range(27, 32))] * 2, [[0, 1] + list(range(22, 27))] * 2]
    assert ev.step_graph.notes["streaming"]["settings"]["keys_cached"] == "pre-RoPE"


def test_cache_bounded_over_500_steps():
    def op(q, k, v, q_pos, k_pos):
        return streaming_reference(k, v, q_pos, k_pos, 4, 16)

    def check(L, k_pos, extra):
        assert k_pos.shape[-1] == min(L, 20)
        want = list(range(min(L, 4))) + list(range(max(4, L - 16), L))
        assert kept_positions(k_pos)[0][0] == want

    op_decode_loop(op, [], 500, on_step=check)


def test_runs_past_the_trained_context():
    """A tiny Llama with 32 trained positions generates 80 tokens; cache indices stay < sinks + window + 1."""
    import transformers as tf

    import graphwright as gw

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.2)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    ev = run_pass(gw.compile(model), Streaming(sinks=2, window=6))
    ids = torch.randint(3, 64, (1, 10))
    out = ev.generate(ids, max_new_tokens=80, eos_token_id=[])
    assert out.shape[1] == 90
    assert ev.last_stats["kept_tokens_per_head"][0] == [[8]]
