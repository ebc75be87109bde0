"""``last_stats`` reports what the process holds (issue 20 item 3): ``kv_storage_bytes`` is the sum of the
distinct storages of every KV tensor the runtime threads to the next step (slack included), ``kv_state_bytes``
the same for positions / scores / summaries, and ``kv_peak_bytes`` includes the full-length K/V each layer
builds inside the prefill step before eviction cuts it."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.runtime.held_bytes import per_token_bytes, prefill_peak_bytes, storage_bytes
from tests.conftest import left_padded_batch


def _capture_states(cm):
    """Wrap the runtime's step so the test sees every state list it returns."""
    rt = cm._runtime if hasattr(cm, "_runtime") else cm.runtime
    seen = []
    inner = rt.step

    def step(*args, **kw):
        logits, state = inner(*args, **kw)
        seen.append(state)
        return logits, state

    rt.step = step
    return rt, seen


@pytest.mark.parametrize("recipe", [None, "h2o(heavy=4, recent=4)", "snapkv(budget=8, window=4)", "streaming(sinks=2, window=6)"])
def test_storage_bytes_are_the_storages_really_held(tiny, recipe):
    cm = gw.compile(tiny("tiny-llama"), recipe=recipe, verify=False)
    rt, seen = _capture_states(cm)
    ids, mask = left_padded_batch(256, [20, 15], seed=1)
    cm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    stats, final = cm.last_stats, seen[-1]
    kv_tensors = [t for t, s in zip(final, rt.specs) if s.kind == "kv"]
    other = [t for t, s in zip(final, rt.specs) if s.kind != "kv"]
    by_ptr = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kv_tensors}
    assert stats["kv_storage_bytes"] == sum(by_ptr.values()) >= stats["kv_bytes"]
    assert stats["kv_state_bytes"] == sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in other}.values()) > 0
    assert stats["kv_peak_bytes"] >= stats["kv_storage_bytes"]
    if recipe is None:  # in-place append grows buffers ahead of need: slack is reported, not hidden
        assert stats["kv_storage_bytes"] > stats["kv_bytes"]


def test_prefill_peak_counts_the_full_prompt_kv_before_eviction(tiny):
    cm = gw.compile(tiny("tiny-llama"), recipe="snapkv(budget=8, window=4)", verify=False)
    ids, mask = left_padded_batch(256, [40, 33], seed=2)
    cm.logits(ids, attention_mask=mask)
    stats = cm.last_stats
    # 2 layers x (K + V): [2 rows, 2 KV heads, 40 tokens, 16 dims] fp32 each -> the last layer at full length
    # while layer 0 already holds its cut cache
    full_layer = 2 * (2 * 2 * 40 * 16 * 4)
    assert stats["kv_peak_bytes"] >= full_layer > stats["kv_storage_bytes"] / 2
    assert stats["kv_peak_bytes"] > stats["kv_storage_bytes"]


def test_shared_storages_count_once_and_the_layer_order_bounds_the_peak():
    from graphwright.capture.step_graph import StateSpec

    base = torch.zeros(2, 1, 10, 4)
    views = [base[:, :, :3], base[:, :, 3:6]]
    assert storage_bytes(views) == base.numel() * 4
    specs = [StateSpec(f"k{i}", "kv", (-1, 1, 0, 4), torch.float32, seq_dim=2, layer=i) for i in range(2)]
    held = [torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4)]
    assert per_token_bytes(specs[0]) == 16
    # layer 0 full (2 x 8 x 16 = 256) while nothing is held; then layer 0's 96 + layer 1 full 256 = 352
    assert prefill_peak_bytes(held, specs, batch=2, prompt_len=8) == 352
