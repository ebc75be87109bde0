"""tiny-gemma3 (sliding window 8 + global layer, two rotary tables, q/k RMSNorm): identity and every
exact pass setting reproduce the dense model past the window; window-bound passes skip the sliding layer."""

from __future__ import annotations

import pytest
import torch

from graphwright.compiled import CompiledModel
from graphwright.errors import RecipeError
from graphwright.ops import schema
from graphwright.passes.match import attr_tensor
from graphwright.verify import run_recipe
from tests.conftest import hf_positions, left_padded_batch

NAME = "tiny-gemma3"
LENGTHS = [20, 13]  # both longer than the 8-token sliding window
NEW = 16


def apply(cm, recipe):
    sg, _, _ = run_recipe(cm.step_graph, recipe, verify=False)
    return CompiledModel(sg)


def _run(cm, ids, mask):
    return cm.logits(ids, mask), cm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)


def test_identity_matches_hf_past_the_window(tiny, compiled_tiny):
    m, cm = tiny(NAME), compiled_tiny(NAME)
    assert m.config.layer_types == ["sliding_attention", "full_attention"] and m.config.sliding_window == 8
    assert [schema.get(n, "window") for n in schema.attention_nodes(cm.step_graph.gm)] == [8, 0]
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    want = m(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert (cm.logits(ids, mask) - want)[mask.bool()].abs().max() <= 1e-4
    want_tokens = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0), want_tokens)


@pytest.mark.parametrize("recipe, tol, skipped", [
    ("lowrank_kv(keep=1.0)", 1e-4, None),
    ("streaming(sinks=4, window=64)", 1e-4, None),
    ("window(size=64)", 0.0, {0: "native sliding window of 8"}),
    ("block_sparse(block=4, top_k=64, dense_layers=[])", 0.0, {0: "native sliding window of 8"}),
    ("h2o(heavy=1.0)", 1e-5, None),
])
def test_exact_settings_reproduce_dense(compiled_tiny, recipe, tol, skipped):
    ids, mask = left_padded_batch(256, LENGTHS, seed=2)
    want_logits, want = _run(compiled_tiny(NAME), ids, mask)
    cm = apply(compiled_tiny(NAME), recipe)
    got_logits, got = _run(cm, ids, mask)
    assert (got_logits - want_logits)[mask.bool()].abs().max() <= tol
    assert torch.equal(got, want)
    note = cm.step_graph.notes[recipe.split("(")[0]]
    if skipped is not None:
        assert note["skipped"] == skipped
        assert note["per_layer"][0]["skipped"] == skipped[0]
        assert "native sliding window of 8" in str(cm.report().to_dict())
        assert 0 not in [schema.layer_of(n) for n in schema.attention_nodes(cm.step_graph.gm)
                         if schema.get(n, "window", 0) == 64 or "block_sparse" in n.meta["graphwright"]["variant"]]


def test_lowrank_keeps_each_layers_table_norm_and_window(compiled_tiny):
    cm = apply(compiled_tiny(NAME), "lowrank_kv(keep=1.0)")
    per = cm.step_graph.notes["lowrank_kv"]["per_layer"]
    assert per[0]["rope_table"].endswith("sliding_attention_inv_freq") and per[1]["rope_table"].endswith("full_attention_inv_freq")
    assert per[0]["k_norm"] and per[1]["k_norm"]
    lat = schema.attention_nodes(cm.step_graph.gm)
    assert [schema.get(n, "window") for n in lat] == [8, 0]
    # the effective Gemma multiplier is 1 + the stored weight
    w = attr_tensor(compiled_tiny(NAME).step_graph.gm, "hf.model.layers.0.self_attn.k_norm.weight")
    assert w.abs().max() > 0.1  # tiny-gemma3's norms are seeded non-zero, so "1 +" matters
    assert torch.equal(attr_tensor(cm.step_graph.gm, str(schema.get(lat[0], "k_norm").target)), 1 + w.float())


def test_lowrank_error_grows_as_rank_falls(compiled_tiny):
    ids, mask = left_padded_batch(256, LENGTHS, seed=3)
    dense = compiled_tiny(NAME).logits(ids, mask)[mask.bool()]
    err = {keep: (apply(compiled_tiny(NAME), f"lowrank_kv(keep={keep})").logits(ids, mask)[mask.bool()] - dense).abs().max().item()
           for keep in (0.9, 0.5)}
    assert all(torch.isfinite(torch.tensor(e)) for e in err.values())
    assert err[0.5] > err[0.9] > 1e-3


def test_steer_alpha_one_is_exact_and_steers(compiled_tiny):
    ids, mask = left_padded_batch(256, [20], seed=4)
    base = compiled_tiny(NAME)
    span = [(2, 6)]
    want = base.logits(ids, mask)
    same = apply(base, "steer(heads={1: [0]}, alpha=1.0)")
    assert (same.logits(ids, mask, emphasis=span) - want).abs().max() <= 1e-5
    assert torch.equal(same.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[], emphasis=span),
                       base.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[]))
    steered = apply(base, "steer(heads={1: [0]}, alpha=0.01)")
    assert (steered.logits(ids, mask, emphasis=span) - want).abs().max() > 1e-3


def test_window_naming_only_sliding_layers_is_refused(compiled_tiny):
    with pytest.raises(RecipeError, match=r"layer\(s\) \[0\] already have a sliding window \(0: 8\); layers without one: \[1\]"):
        apply(compiled_tiny(NAME), "window(size=64, layers=[0])")
    with pytest.raises(RecipeError, match=r"dense_layers=\[1\] and layers \[0\] have a sliding window.*leaves no layer"):
        apply(compiled_tiny(NAME), "block_sparse(block=4, top_k=64, dense_layers=[1])")
