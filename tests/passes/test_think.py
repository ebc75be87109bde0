"""``think`` (ThinK key-channel pruning) on the tiny models: identity, real bytes, composition, refusals."""

from __future__ import annotations

import functools

import pytest
import torch

import graphwright as gw
from graphwright import RecipeError
from graphwright.passes.think import kept_channels
from tests.conftest import _tiny
from tests.passes.registry_examples import prompt

GEN = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0)


@functools.lru_cache(maxsize=None)
def run(model: str, recipe: str | None):
    cm = gw.compile(_tiny(model), recipe=recipe)
    ids, mask = prompt()
    logits = cm.logits(ids, attention_mask=mask)
    tokens = cm.generate(ids, attention_mask=mask, **GEN)
    return cm, logits, tokens, dict(cm.last_stats)


@pytest.mark.parametrize("model,recipe", [("tiny-llama", "think(keep=1.0, recent=2, window=3)"),
                                          ("tiny-qwen2", "snapkv(budget=1000) + think(keep=1.0, recent=2)")])
def test_keep_one_is_identity(model, recipe):
    _, want_logits, want_tokens, dense = run(model, None)
    cm, logits, tokens, stats = run(model, recipe)
    real = prompt()[1].bool()
    assert (logits[real] - want_logits[real]).abs().max().item() <= 1e-5
    assert torch.equal(tokens, want_tokens)
    assert stats["kv_bytes"] == dense["kv_bytes"]


def expected_kv_bytes(cm, recent: int, keep: float, prompt_slots: int) -> int:
    """Per layer, row and KV head: values and full-width keys for every slot (prompt slots, padding included, plus
    the fed-back tokens), minus the pruned channels of the prompt slots before the last ``recent`` (fp32)."""
    info = cm.step_graph.info
    B, slots = 2, prompt_slots + GEN["max_new_tokens"] - 1
    D, ch = info.head_dim, kept_channels(keep, info.head_dim)
    old = max(prompt_slots - recent, 0)
    per_head = slots * D * 2 - old * (D - ch)
    return info.num_layers * B * info.num_kv_heads * per_head * 4


def test_kv_bytes_count_the_narrow_keys():
    recipe = "think(keep=0.5, recent=3, window=4)"
    cm, _, tokens, stats = run("tiny-llama", recipe)
    assert stats["kv_bytes"] == expected_kv_bytes(cm, 3, 0.5, prompt()[0].shape[1])  # 14 prompt slots (row 1: 5 padding)
    assert stats["kv_bytes"] < run("tiny-llama", None)[3]["kv_bytes"]
    notes = cm.step_graph.notes["think"]
    assert notes["counts"]["layers_pruned"] == cm.step_graph.info.num_layers
    assert notes["settings"]["kept_channels"] == cm.step_graph.info.head_dim // 2


def test_snapkv_then_think_prunes_the_kept_tokens():
    """Either written order runs snapkv first; the cache holds budget slots per head, the old ones narrow."""
    cm, logits, tokens, stats = run("tiny-llama", "think(keep=0.5, recent=3, window=4) + snapkv(budget=6, window=2)")
    cm2, logits2, tokens2, _ = run("tiny-llama", "snapkv(budget=6, window=2) + think(keep=0.5, recent=3, window=4)")
    assert cm.step_graph.notes["pass_order"]["order"] == ["snapkv", "think"]
    assert torch.equal(logits, logits2) and torch.equal(tokens, tokens2)
    # both rows (14 and 9 tokens) keep 6 prompt tokens per head, then append the 5 fed-back tokens
    assert stats["kv_bytes"] == expected_kv_bytes(cm, 3, 0.5, 6)
    hk = cm.step_graph.info.num_kv_heads
    assert stats["kept_tokens_per_head"] == [[[11] * hk] * 2] * cm.step_graph.info.num_layers
    _, want_logits, want_tokens, _ = run("tiny-llama", None)
    assert torch.equal(tokens[:, 14], want_tokens[:, 14])  # prefill attention is dense: the first new token is the dense one


@pytest.mark.parametrize("recipe,words", [
    ("h2o(heavy=4, recent=4) + think(keep=0.5)", ["think", "h2o", "evicts during decode"]),
    ("lowrank_kv(keep=0.5) + think(keep=0.5)", ["think", "lowrank_kv", "no key channels to prune"]),
])
def test_refused_compositions_name_the_reason(recipe, words):
    with pytest.raises(RecipeError) as exc:
        gw.compile(_tiny("tiny-llama"), recipe=recipe)
    for w in words:
        assert w in str(exc.value), str(exc.value)


def test_bad_settings_are_refused():
    with pytest.raises(RecipeError, match=r"'keep' = 0.0 is out of range"):
        gw.compile(_tiny("tiny-llama"), recipe="think(keep=0.0)")
    with pytest.raises(RecipeError, match="pool"):
        gw.compile(_tiny("tiny-llama"), recipe="think(pool='sum')")
