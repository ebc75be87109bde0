"""layers= on eviction passes: different policies on different layers, in either order; range errors."""

from __future__ import annotations

import pytest
import torch

from graphwright import RecipeError
from graphwright.compiled import CompiledModel
from graphwright.passes.fastgen import FastGen
from graphwright.passes.h2o import H2O
from graphwright.passes.snapkv import SnapKV
from graphwright.passes.streaming import Streaming
from graphwright.verify import run_recipe
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, state_of

LENGTHS = [12, 7]
H2O_0 = "h2o(heavy=2, recent=2, layers=[0])"
STREAM_1 = "streaming(sinks=2, window=3, layers=[1])"


@pytest.fixture(scope="module")
def mixed():
    from tests.conftest import _compiled

    sg = _compiled("tiny-llama").step_graph
    return {order: CompiledModel(run_recipe(sg, " + ".join(recipe))[0])
            for order, recipe in (("h2o_first", (H2O_0, STREAM_1)), ("streaming_first", (STREAM_1, H2O_0)))}


def test_two_policies_on_two_layers_in_either_order(mixed):
    ids, mask = left_padded_batch(256, LENGTHS, seed=5)
    tokens = []
    for order, cm in mixed.items():
        names = [s.name for s in cm.step_graph.state]
        assert "attn_score0" in names and "attn_score1" not in names and "key_positions" not in names, order
        assert set(cm.step_graph.notes["h2o"]["per_layer"]) == {0} and set(cm.step_graph.notes["streaming"]["per_layer"]) == {1}

        def check(i, state, cm=cm):
            real = [n + i for n in LENGTHS]
            kp0 = state_of(cm, state, "key_positions0")
            assert ((kp0 >= 0).sum(-1) == 4).all()  # h2o: 2 heavy + 2 recent per head
            # sorted: the torch backend evicts on slots at decode (any order, codegen/torch/eviction_slots.py)
            assert all(sorted(p)[-2:] == [L - 2, L - 1] for row, L in zip(kept_positions(kp0), real) for p in row)
            kp1 = [[sorted(p) for p in row] for row in kept_positions(state_of(cm, state, "key_positions1"))]
            assert kp1 == [[[0, 1] + list(range(L - 3, L))] * 2 for L in real]  # streaming: sinks + window

        _, toks, _ = decode_loop(cm, ids, mask, 12, on_step=check)
        tokens.append(toks)
        out = cm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
        assert torch.equal(out[:, ids.shape[1]:], toks)
    assert torch.equal(tokens[0], tokens[1])  # the same per-layer policies whatever the pass order


def test_one_layer_evicted_the_other_dense(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ev = CompiledModel(run_recipe(cm.step_graph, "snapkv(budget=4, window=2, layers=[1])")[0])
    ids, mask = left_padded_batch(256, LENGTHS, seed=6)
    _, _, state = decode_loop(ev, ids, mask, 3)
    assert any(s.name == "key_positions" for s in ev.step_graph.state)  # layer 0 still reads the shared positions
    assert state_of(ev, state, "k0").shape[2] == 12 + 3
    assert ((state_of(ev, state, "key_positions1") >= 0).sum(-1) == torch.tensor([[4 + 3] * 2] * 2)).all()


def test_layer_set_and_range_errors(compiled_tiny):
    info = compiled_tiny("tiny-llama").info
    for cls in (H2O, SnapKV, FastGen, Streaming):
        assert cls().layer_set(info) == {0, 1}
        assert cls(layers=[1]).layer_set(info) == {1}
        with pytest.raises(RecipeError, match=r"valid layers are 0\.\.1"):
            cls(layers=[0, 2]).layer_set(info)
    with pytest.raises(RecipeError, match=r"h2o: layers=\[5\] has 5 out of range; valid layers are 0\.\.1"):
        run_recipe(compiled_tiny("tiny-llama").step_graph, "h2o(layers=[5])", verify=False)
    with pytest.raises(RecipeError, match="repeats"):
        H2O(layers=[0, 0]).layer_set(info)
    # two policies on one layer: the pass manager refuses before any surgery, naming both
    with pytest.raises(RecipeError, match=r"h2o \+ streaming: .*cannot share a layer: one eviction policy per layer"):
        run_recipe(compiled_tiny("tiny-llama").step_graph, f"{H2O_0} + streaming(layers=[0, 1])", verify=False)
