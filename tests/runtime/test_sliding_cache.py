"""Native sliding-window layers cache only their window on the torch backend (``passes/native_windows.py``).

Checked against HF's own cache (``DynamicCache`` with ``DynamicSlidingWindowLayer``, which keeps the
last w - 1 tokens of a sliding layer): same greedy tokens and logits as HF and as the unbounded
torch run, ``kv_bytes`` equal to the k/v bytes in HF's ``past_key_values`` after prefill and after
generating past the window, ``kv_bytes_dense`` equal to them too (the original model's cache).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graphwright.codegen.backends import TORCH
from graphwright.compiled import CompiledModel
from graphwright.passes.native_windows import NOTE
from graphwright.verify import run_recipe
from tests.conftest import hf_positions, left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, state_of

UNBOUNDED = dataclasses.replace(TORCH, name="torch_unbounded", step_rewrites=())
LENGTHS = [20, 13]  # both longer than the windows (8: tiny-gemma3's sliding layer, 16: tiny-mistral)


def hf_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("name,windows,new", [("tiny-gemma3", (8, 0), 1), ("tiny-gemma3", (8, 0), 24), ("tiny-mistral", (16, 16), 24)])
def test_kv_bytes_equal_hf_cache(tiny, compiled_tiny, name, windows, new):
    """new = 1: after prefill only (HF holds the last w - 1 prompt columns); 24: past the window."""
    m, cm = tiny(name), compiled_tiny(name)
    assert cm.info.windows == windows
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    hf = m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
                    return_dict_in_generate=True)
    got = cm.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, hf.sequences)
    stats = cm.last_stats
    assert stats["kv_bytes"] == hf_cache_bytes(hf.past_key_values)
    assert stats["kv_bytes_dense"] == stats["kv_bytes"] and stats["kept_fraction"] == 1.0
    unbounded = CompiledModel(cm.step_graph, backend=UNBOUNDED)
    assert torch.equal(unbounded.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0), got)
    assert unbounded.last_stats["kv_bytes"] > stats["kv_bytes"]  # the full history in every sliding layer


def test_sliding_layer_holds_the_last_window_and_matches_logits(tiny, compiled_tiny):
    """tiny-gemma3: after prefill and every decode step layer 0 holds each row's last 7 positions in one
    ring buffer (storage flat); its logits equal HF's and the unbounded run's; layer 1 keeps everything."""
    m, cm = tiny("tiny-gemma3"), compiled_tiny("tiny-gemma3")
    assert cm.runtime_graph.notes[NOTE] == {0: {"window": 8, "cached_tokens": 7}}
    assert NOTE not in cm.step_graph.notes and "key_positions0" not in [s.name for s in cm.step_graph.state]
    ids, mask = left_padded_batch(256, LENGTHS, seed=2)
    want = m(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert (cm.logits(ids, mask) - want)[mask.bool()].abs().max() <= 1e-4
    sets, ptrs = [], []

    def on_step(i, state):
        sets.append([[sorted(h) for h in row] for row in kept_positions(state_of(cm, state, "key_positions0"))])
        ptrs.append(state_of(cm, state, "k0").untyped_storage().data_ptr())

    got, toks, state = decode_loop(cm, ids, mask, 30, on_step)
    unbounded = CompiledModel(cm.step_graph, backend=UNBOUNDED)
    want, want_toks, _ = decode_loop(unbounded, ids, mask, 30)
    assert torch.equal(toks, want_toks) and (got - want).abs().max() <= 1e-5
    for i, step in enumerate(sets):
        assert step == [[list(range(n + i - 7, n + i))] * 2 for n in LENGTHS]
    assert len(set(ptrs[1:])) == 1  # one ring buffer from the first decode step on
    assert state_of(cm, state, "k0").shape[2] == 7 and state_of(cm, state, "k1").shape[2] == 20 + 30


@pytest.mark.parametrize("recipe,bounded", [("h2o(heavy=4, recent=2)", set()), ("h2o(heavy=4, recent=2, layers=[1])", {0}),
                                            ("window(size=4)", {0})])
def test_a_pass_that_rewrites_a_sliding_layer_keeps_its_own_cache_policy(compiled_tiny, recipe, bounded):
    """Eviction on layer 0 owns its cache (not bounded again; streaming gives per-layer positions the same way); h2o on layer 1 only and the window
    pass (a mask on layer 1; layer 0's native window is skipped) leave layer 0 bounded; it still generates."""
    sg, _, _ = run_recipe(compiled_tiny("tiny-gemma3").step_graph, recipe, verify=False)
    cm = CompiledModel(sg)
    assert set(cm.runtime_graph.notes.get(NOTE, {})) == bounded
    ids, mask = left_padded_batch(256, LENGTHS, seed=3)
    assert cm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).shape == (2, 32)
