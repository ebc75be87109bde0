"""streaming with one window per layer: each layer keeps what the single-window pass keeps there (issue 21).

``streaming(window=[w_0, w_1])`` on tiny Llama (2 layers), a ragged left-padded batch of 2 and decode
steps that evict at every step; checked on the torch backend (``streaming_shift``: keys cached at
their absolute rotation, per-step memos keyed by (sinks, window)) and on the compacting references
(pre-RoPE cache, ``rope_cache_index``), and against the split form (two passes on disjoint layers).
"""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.errors import RecipeError
from graphwright.passes.base import PassContext
from graphwright.passes.budgets import budget_of, first_length_acting
from graphwright.passes.streaming import Streaming
from graphwright.recipes import Recipe
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, decode_loop, kept_positions, run_pass, state_of

LENGTHS = [12, 7]  # batch 2, row 1 left-padded by 5
STEPS = 40


def kept(cm, state, layer):
    """[B][Hk] sorted kept positions of one layer."""
    return [[sorted(h) for h in row] for row in kept_positions(state_of(cm, state, f"key_positions{layer}"))]


def sets_per_step(cm, ids, mask, layer, steps=STEPS):
    seen = []
    logits, toks, _ = decode_loop(cm, ids, mask, steps, lambda i, s: seen.append(kept(cm, s, layer)))
    return seen, logits, toks


def test_each_layer_keeps_what_a_single_window_keeps_there(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=5)
    per_layer = run_pass(cm, Streaming(sinks=2, window=[3, 8]))
    assert per_layer.step_graph.notes["streaming"]["per_layer"] == {0: {"sinks": 2, "window": 3}, 1: {"sinks": 2, "window": 8}}
    code = per_layer.lowered_code()  # the torch backend's shift applies to both layers, windows differing
    assert code.count("streaming_attention(") == 2 and "rope_cache_index" not in code
    for layer, window in ((0, 3), (1, 8)):
        single = run_pass(cm, Streaming(sinks=2, window=window))
        got, _, _ = sets_per_step(per_layer, ids, mask, layer)
        want, _, _ = sets_per_step(single, ids, mask, layer)
        assert got == want
        last = STEPS + 12  # row 0 holds positions 0 .. last - 1 after the last step
        assert got[-1][0][0] == [0, 1] + list(range(last - window, last))  # sinks + this layer's window
        assert got[-1][1][1] == [0, 1] + list(range(last - 5 - window, last - 5))  # the padded row
        assert all(len(h) == min(2 + window, 12 + i) for i, step in enumerate(got) for h in step[0])  # evicts every step


def test_the_shift_matches_the_compacting_reference_with_different_windows(compiled_tiny):
    """Torch backend (no key re-rotation, memo per (sinks, window)) vs the pre-RoPE reference: same sets, logits 1e-4."""
    sg = Streaming(sinks=2, window=[3, 8]).run(compiled_tiny("tiny-llama").step_graph.copy(), PassContext())
    fast, ref = gw.CompiledModel(sg, backend="torch"), gw.CompiledModel(sg, backend=COMPACTING)
    assert "rope_cache_index" in ref.lowered_code()
    ids, mask = left_padded_batch(256, LENGTHS, seed=6)
    sets = {"fast": [], "ref": []}
    both = lambda cm, key: (lambda i, s: sets[key].append([kept(cm, s, 0), kept(cm, s, 1)]))  # noqa: E731
    got, got_toks, _ = decode_loop(fast, ids, mask, STEPS, both(fast, "fast"))
    want, want_toks, _ = decode_loop(ref, ids, mask, STEPS, both(ref, "ref"))
    assert sets["fast"] == sets["ref"]
    assert len(sets["fast"][-1][0][0][0]) == 5 and len(sets["fast"][-1][1][0][0]) == 10
    assert torch.equal(got_toks, want_toks)
    assert (got - want).abs().max() <= 1e-4


def test_two_passes_on_disjoint_layers_equal_the_list_form(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=7)
    sg = cm.step_graph.copy()
    first = Streaming(sinks=2, window=3, layers=[0])
    second = Streaming(sinks=2, window=8, layers=[1])
    sg = first.run(sg, PassContext())
    assert second.applies_to(sg) is None  # its rotary check reads only its own layer
    split = gw.CompiledModel(second.run(sg, PassContext()))
    notes = split.step_graph.notes["streaming"]
    assert notes["per_layer"] == {0: {"sinks": 2, "window": 3}, 1: {"sinks": 2, "window": 8}}
    assert (notes["settings"]["layers"], notes["settings"]["window"], notes["counts"]["layers_evicted"]) == ([0, 1], [3, 8], 2)
    listed = run_pass(cm, Streaming(sinks=2, window=[3, 8]))
    got, got_toks, _ = decode_loop(split, ids, mask, STEPS)
    want, want_toks, _ = decode_loop(listed, ids, mask, STEPS)
    assert torch.equal(got_toks, want_toks) and (got - want).abs().max() <= 1e-6
    assert split._runtime.max_positions is None  # both layers stream: positions stay within the cache (runtime.inputs.position_limit)


def test_windows_covering_everything_are_the_dense_model(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=8)
    want_logits, want, _ = decode_loop(cm, ids, mask, 24)
    got_logits, got, _ = decode_loop(run_pass(cm, Streaming(sinks=4, window=[60, 40])), ids, mask, 24)
    assert torch.equal(got, want)
    assert (got_logits - want_logits).abs().max() <= 1e-4  # the pre-RoPE round trip costs ~1e-6


def test_a_list_of_one_repeated_window_is_the_scalar_window(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=9)
    a, a_toks, _ = decode_loop(run_pass(cm, Streaming(sinks=2, window=[5, 5])), ids, mask, 20)
    b, b_toks, _ = decode_loop(run_pass(cm, Streaming(sinks=2, window=5)), ids, mask, 20)
    assert torch.equal(a_toks, b_toks) and torch.equal(a, b)


def test_window_list_errors_name_what_is_allowed(tiny):
    with pytest.raises(RecipeError, match="streaming: a per-layer window must be a non-empty list of ints"):
        Streaming(window=[4, 0])
    with pytest.raises(RecipeError, match="a per-layer window must be"):
        Streaming(window=[4, True])
    with pytest.raises(RecipeError, match="a per-layer window must be"):
        Streaming(window=[])
    with pytest.raises(RecipeError, match="window lists 3 per-layer windows but the pass evicts 2 layer"):
        gw.compile(tiny("tiny-llama"), recipe="streaming(window=[4, 5, 6])", verify=False)
    with pytest.raises(RecipeError, match="window lists 2 per-layer windows but the pass evicts 1 layer"):
        gw.compile(tiny("tiny-llama"), recipe="streaming(window=[4, 5], layers=[1])", verify=False)


def test_recipe_forms_compile_and_the_budget_reads_the_list(tiny, tmp_path):
    r = Recipe.parse("streaming(sinks=2, window=[3, 8])")
    (tmp_path / "r.toml").write_text(r.to_toml())
    assert Recipe.parse(str(tmp_path / "r.toml")) == r  # what a tuning Pareto point writes
    cm = gw.compile(tiny("tiny-llama"), recipe=r)  # verified: the probe crosses the largest window
    assert cm.recipe == r
    split = gw.compile(tiny("tiny-llama"), recipe="streaming(sinks=2, window=3, layers=[0]) + streaming(sinks=2, window=8, layers=[1])")
    assert split.step_graph.notes["streaming"]["settings"]["window"] == [3, 8]
    b = budget_of(Streaming(sinks=2, window=[3, 8]))
    assert b.acts_after == first_length_acting(10, 0.0) == budget_of(Streaming(sinks=2, window=8)).acts_after
    assert b.warn is None and "near zero" in budget_of(Streaming(sinks=0, window=[1, 8])).warn
