"""h2o: exact at budget >= length, dense prefill, budgets over long decodes, recipe/report plumbing."""

from __future__ import annotations

import pytest
import torch

from graphwright import RecipeError
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction_ref import h2o_reference
from graphwright.passes.h2o import H2O
from graphwright.verify import run_recipe
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import assert_exact_setting, decode_loop, floor_budget, op_decode_loop, run_pass

LENGTHS = [12, 7]  # batch 2, row 1 left-padded by 5


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_budget_at_least_length_is_identity(compiled_tiny, name):
    cm = compiled_tiny(name)
    ev, ids, mask = assert_exact_setting(cm, H2O(heavy=1.0, recent=0.1), 32, LENGTHS)
    out = ev.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=[])
    assert torch.equal(out, cm.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=[]))
    # padding never counts as a kept token: each head holds exactly the row's real tokens
    kept = ev.last_stats["kept_tokens_per_head"]
    assert kept[0] == [[12 + 31] * 2, [7 + 31] * 2] and ev.last_stats["kept_fraction"] == 1.0


def test_first_token_equals_dense(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=2)
    dense, _, _ = decode_loop(cm, ids, mask, 0)
    ev, _, state = decode_loop(run_pass(cm, H2O(heavy=2, recent=2)), ids, mask, 0)
    assert torch.equal(ev[0], dense[0])


def test_counts_hold_in_the_model(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=3)
    ev = run_pass(cm, H2O(heavy=3, recent=2))
    ev.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    s = ev.last_stats
    assert all(h == 5 for layer in s["kept_tokens_per_head"] for row in layer for h in row)
    info = ev.info
    assert s["kv_bytes"] == 2 * info.num_layers * info.num_kv_heads * 5 * info.head_dim * 4 * 2  # B = 2, 5 slots
    assert s["kv_bytes"] < s["kv_bytes_dense"] / 4


@pytest.mark.parametrize("heavy,recent", [((4, 0.0), (4, 0.0)), ((0, 0.1), (0, 0.1))])
def test_budget_holds_over_500_steps(heavy, recent):
    def op(q, k, v, q_pos, k_pos, score):
        return h2o_reference(q, k, v, q_pos, k_pos, score, 0.35, heavy[0], heavy[1], recent[0], recent[1])

    def check(L, k_pos, extra):
        kept = (k_pos >= 0).sum(-1)
        cap = heavy[0] + recent[0] + floor_budget(heavy[1], L) + floor_budget(recent[1], L)
        assert int(kept.max()) <= max(cap, 0) and k_pos.shape[-1] == int(kept.max())
        assert (k_pos >= L - recent[0] - floor_budget(recent[1], L)).sum(-1).min() >= min(L, recent[0] + floor_budget(recent[1], L))
        if heavy[1] == 0:
            assert int(kept.min()) == min(L, cap)  # counts: the cache is always full

    op_decode_loop(op, [torch.zeros(1, 2, 0)], 500, on_step=check)


def test_recipe_report_and_applies_once(compiled_tiny):
    sg = compiled_tiny("tiny-llama").step_graph
    new, _, verification = run_recipe(sg, "h2o(heavy=4, recent=4)")
    assert [s.name for s in new.state if s.layer == 0] == ["k0", "v0", "key_positions0", "attn_score0"]
    assert all(s.name != "key_positions" for s in new.state)
    assert new.notes["h2o"]["counts"]["layers_evicted"] == 2
    assert "h2o" in str(CompiledModel(new).report())
    assert verification["passes"][0]["exact"] is False
    assert "applies once" in H2O().applies_to(new)
    with pytest.raises(RecipeError, match="applies once"):
        run_recipe(sg, "h2o(heavy=4, recent=4) + h2o(heavy=4, recent=4)")
    assert run_recipe(sg, "h2o(heavy=1.0)")[2]["passes"][0]["exact"] is True
