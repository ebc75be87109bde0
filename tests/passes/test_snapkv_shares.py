"""snapkv(heads="scores"): per-(layer, KV head) budget shares from head scores on the packed cache.

Exact settings (gamma = 0 is uniform SnapKV's kept sets and logits; budget >= length is the identity), the
kept counts are the share table (``head_shares``) with the model's total budget, a ragged split frees real
bytes, the tuning space holds gamma, and the refusals.
"""

from __future__ import annotations

import pytest
import torch

from graphwright import RecipeError
from graphwright.heads.headset import HeadSet
from graphwright.ops.head_shares import head_shares, share_weights
from graphwright.passes.snapkv import SnapKV
from graphwright.runtime.generate import state_bytes
from graphwright.tuning.space import recipe_for, search_space
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import assert_exact_setting, decode_loop, kept_after_prefill, random_headset, run_pass, state_of


def _headset(cm, tmp_path, seed=0):
    return random_headset(cm.step_graph.info, tmp_path, seed, zero_below=0.4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_budget_at_least_length_is_identity(compiled_tiny, tmp_path, name):
    cm = compiled_tiny(name)
    path, _ = _headset(cm, tmp_path)
    assert_exact_setting(cm, SnapKV(budget=12, window=4, heads="scores", gamma=3.0, headset=path), 8, [12, 7])


def test_gamma_zero_equals_uniform_snapkv(compiled_tiny, tmp_path):
    cm = compiled_tiny("tiny-llama")
    path, _ = _headset(cm, tmp_path)
    ids, mask = left_padded_batch(256, [20, 9], seed=2)
    ref = run_pass(cm, SnapKV(budget=8, window=3, kernel=3, pool="max"))
    got = run_pass(cm, SnapKV(budget=8, window=3, kernel=3, pool="max", heads="scores", gamma=0.0, headset=path))
    want_logits, want_sets = kept_after_prefill(ref, ids, mask, range(ref.step_graph.info.num_layers))
    got_logits, got_sets = kept_after_prefill(got, ids, mask, range(got.step_graph.info.num_layers))
    assert got_sets == want_sets
    assert (got_logits - want_logits).abs().max() <= 1e-4


def test_kept_counts_are_the_share_table_and_bytes_are_real(compiled_tiny, tmp_path):
    cm = compiled_tiny("tiny-llama")
    info = cm.step_graph.info
    path, s = _headset(cm, tmp_path, seed=1)
    budget, window, n = 10, 2, 40
    ids, mask = left_padded_batch(256, [n, 30], seed=3)
    ev = run_pass(cm, SnapKV(budget=budget, window=window, heads="scores", gamma=2.0, headset=path, floor=0.0))
    _, sets = kept_after_prefill(ev, ids, mask, range(ev.step_graph.info.num_layers))
    weights = share_weights(s.flatten().tolist(), 2.0, 0.01)
    hk = info.num_kv_heads
    for row, length in enumerate([n, 30]):
        table = head_shares(weights, info.num_layers * hk * budget, length, window)
        got = [len(sets[layer][row][h]) for layer in range(info.num_layers) for h in range(hk)]
        assert list(table) == got
        assert sum(got) == info.num_layers * hk * budget
        assert len(set(got)) > 1  # the split is ragged
    # the top-scored head keeps more than the uniform budget; bytes held are the packed totals, below uniform's padding
    top = int(torch.argmax(s.flatten()))
    assert len(sets[top // hk][0][top % hk]) > budget
    _, _, state = decode_loop(ev, ids, mask, 3)
    want, padded = 0, 0
    for layer in range(info.num_layers):
        kp = state_of(ev, state, f"key_positions{layer}")
        per_head = (kp >= 0).sum(-1)  # [B, Hk]
        assert kp.shape[-1] == int(per_head.sum(-1).max())  # one packed buffer: the longest row's total
        want += 2 * kp.shape[0] * kp.shape[-1] * info.head_dim * 4
        padded += 2 * kp.shape[0] * hk * int(per_head.max()) * info.head_dim * 4
    assert state_bytes(state, ev.step_graph.state) == want < padded
    ev.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    assert ev.last_stats["kv_bytes"] == want


def test_notes_and_refusals(compiled_tiny, tmp_path):
    cm = compiled_tiny("tiny-llama")
    path, _ = _headset(cm, tmp_path)
    ev = run_pass(cm, SnapKV(budget=8, heads="scores", headset=path))
    shares = ev.step_graph.notes["snapkv"]["shares"]
    assert shares["gamma"] == 1.0 and shares["eps"] == 0.01 and shares["floor_tokens"] == 4
    with pytest.raises(RecipeError, match="gamma set the heads='scores'"):
        SnapKV(budget=8, gamma=2.0)
    with pytest.raises(RecipeError, match="pyramid"):
        SnapKV(budget=8, heads="scores", pyramid=20.0)
    with pytest.raises(RecipeError, match="no head set ships"):
        run_pass(cm, SnapKV(budget=8, heads="scores"))
    bad = HeadSet(model="x", method="retrieval", scores=((0.1,),), retrieval=frozenset()).save(tmp_path / "bad.json")
    with pytest.raises(RecipeError, match="KV heads"):
        run_pass(cm, SnapKV(budget=8, heads="scores", headset=str(bad)))


def test_tuning_space_searches_gamma_only_with_scores():
    names = {p.arg: p for p in search_space('snapkv(heads="scores")', 1024)}
    assert set(names) == {"budget", "gamma"}
    assert (names["gamma"].kind, names["gamma"].low, names["gamma"].high) == ("float", 0.0, 8.0)
    assert {p.arg for p in search_space("snapkv", 1024)} == {"budget"}
    space = search_space('snapkv(heads="scores")', 1024)
    rec = recipe_for('snapkv(heads="scores")', space, {"0.snapkv.budget": 256, "0.snapkv.gamma": 2.5})
    assert rec.to_list() == [{"pass": "snapkv", "heads": "scores", "budget": 256, "gamma": 2.5}]


def test_every_point_of_the_scores_space_is_a_valid_recipe():
    from graphwright.passes.base import instantiate

    template = 'snapkv(heads="scores")'
    space = search_space(template, 300)
    for p in space:
        for v in (p.low, p.high):
            values = {q.name: q.low for q in space} | {p.name: v}
            (made,) = instantiate(recipe_for(template, space, values))
            assert made.values[p.arg] == v and made.heads == "scores"
