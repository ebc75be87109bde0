"""evict(score=..., rule='scores'): head-score budget shares (the rule of snapkv(heads='scores')) over any per-head
prefill scorer, on the packed cache.

Exact settings (budget >= length is the identity; gamma = 0 gives rule='fixed''s kept sets and logits), the kept
counts are the share table over the model's total budget, score='snapkv' equals snapkv(heads='scores'), the notes
record the weights, and the refusals name what is allowed.
"""

from __future__ import annotations

import pytest

from graphwright import RecipeError
from graphwright.ops.adakv_scored import EVICT_ADAKV_SCORED
from graphwright.ops.head_shares import head_shares, share_weights
from graphwright.passes.evict import Evict
from graphwright.passes.snapkv import SnapKV
from tests.codegen.test_compiled_eviction import with_recipe
from tests.conftest import _compiled, left_padded_batch
from tests.passes.duo_common import EVERY_HEAD_RETRIEVAL, compile_tiny
from tests.passes.eviction_helpers import assert_exact_setting, kept_after_prefill, random_headset, run_pass


def _headset(cm, tmp_path, seed=0):
    return random_headset(cm.step_graph.info, tmp_path, seed, zero_below=0.4)


@pytest.mark.parametrize("score", ["knorm", "expected_attention"])
def test_budget_at_least_length_is_identity(tmp_path, score):
    cm = _compiled("tiny-llama")
    path, _ = _headset(cm, tmp_path)
    p = Evict(score=score, budget=12, window=2, rule="scores", gamma=3.0, headset=path)
    ev = run_pass(cm, p)
    assert any(n.target is EVICT_ADAKV_SCORED and n.kwargs.get("weights") for n in ev.step_graph.gm.graph.nodes)
    assert_exact_setting(cm, p, 8, [12, 7])


@pytest.mark.parametrize("score", ["knorm", "keydiff", "expected_attention"])
def test_gamma_zero_equals_the_fixed_rule(tmp_path, score):
    cm = _compiled("tiny-llama")
    path, _ = _headset(cm, tmp_path)
    ids, mask = left_padded_batch(256, [20, 9], seed=2)
    layers = range(cm.step_graph.info.num_layers)
    want_logits, want_sets = kept_after_prefill(run_pass(cm, Evict(score=score, budget=8, window=2)), ids, mask, layers)
    got = run_pass(cm, Evict(score=score, budget=8, window=2, rule="scores", gamma=0.0, headset=path, floor=0.0))
    got_logits, got_sets = kept_after_prefill(got, ids, mask, layers)
    assert got_sets == want_sets
    assert (got_logits - want_logits).abs().max() <= 1e-4


def test_kept_counts_are_the_share_table(tmp_path):
    cm = _compiled("tiny-llama")
    info = cm.step_graph.info
    path, s = _headset(cm, tmp_path, seed=1)
    budget, window, n = 10, 2, 40
    ids, mask = left_padded_batch(256, [n, 30], seed=3)
    ev = run_pass(cm, Evict(score="expected_attention", budget=budget, window=window, rule="scores", gamma=2.0,
                            headset=path, floor=0.0))
    _, sets = kept_after_prefill(ev, ids, mask, range(info.num_layers))
    weights = share_weights(s.flatten().tolist(), 2.0, 0.01)
    hk = info.num_kv_heads
    protected = window + 4  # expected_attention keeps 4 sinks by default
    for row, length in enumerate([n, 30]):
        table = head_shares(weights, info.num_layers * hk * budget, length, protected)
        got = [len(sets[layer][row][h]) for layer in range(info.num_layers) for h in range(hk)]
        assert list(table) == got and sum(got) == info.num_layers * hk * budget
        assert len(set(got)) > 1  # the split is ragged
    notes = ev.step_graph.notes["evict"]
    assert notes["shares"]["gamma"] == 2.0 and notes["shares"]["weights"][0] == list(weights[:hk])
    assert "head-score shares" in notes["settings"]["rule_text"]


def test_snapkv_scorer_equals_snapkv_heads_scores(tmp_path):
    cm = _compiled("tiny-llama")
    path, _ = _headset(cm, tmp_path, seed=2)
    ids, mask = left_padded_batch(256, [30, 22], seed=5)
    layers = range(cm.step_graph.info.num_layers)
    want = kept_after_prefill(run_pass(cm, SnapKV(budget=10, window=3, kernel=3, heads="scores", gamma=2.0,
                                                  headset=path, floor=0.0)), ids, mask, layers)
    got = kept_after_prefill(run_pass(cm, Evict(score="snapkv", budget=10, window=3, kernel=3, smooth="avg",
                                                rule="scores", gamma=2.0, headset=path, floor=0.0)), ids, mask, layers)
    assert got[1] == want[1]
    assert (got[0] - want[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(score="knorm", budget=8, gamma=1.0), "gamma applies to rule='scores'"),
    (dict(score="knorm", budget=8, headset="shipped"), "headset applies to rule='scores'"),
    (dict(score="tova", budget=8, rule="scores"), "rule='scores' splits the model's budget once, after prefill"),
    (dict(score="tova", budget=8, rule="scores", when="prefill"), "per-head scores"),
    (dict(score="h2o", budget=8, rule="scores", when="prefill"), "running per-slot state"),
    (dict(score="criticalkv", budget=8, rule="scores"), "own two-stage rule"),
    (dict(score="keydiff", budget=8, rule="scores", block=4), "block= with rule='scores'"),
    (dict(score="knorm", budget=0.5, window=0.1, rule="scores"), "fraction window is refused"),
])
def test_refusals_say_what_is_allowed(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        Evict(**kwargs)


def test_after_duo_and_on_the_compiled_backend_it_is_refused_with_the_reason(tmp_path):
    path, _ = _headset(_compiled("tiny-llama"), tmp_path)
    with pytest.raises(RecipeError, match="rule='scores' \\(duo already decides per head"):
        compile_tiny(f"{EVERY_HEAD_RETRIEVAL} + evict(score='knorm', budget=8, rule='scores', headset='{path}')")
    with pytest.raises(ValueError, match=r"backend='compiled' cannot run this recipe: .*'scores'.*packed per-layer"):
        with_recipe(_compiled("tiny-llama"), f"evict(score='knorm', budget=8, rule='scores', headset='{path}')", "compiled")


def test_no_shipped_head_set_is_a_clear_error():
    with pytest.raises(RecipeError, match="evict\\(rule='scores'\\).*no head set ships"):
        run_pass(_compiled("tiny-llama"), Evict(score="knorm", budget=8, rule="scores"))
