"""match.rotary_table: each attention layer's own rotary table; key_norm: the RMSNorm on the key path."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops import schema
from graphwright.passes.match import NoMatch, RopeInfo, attr_tensor, key_norm, rotary_table
from graphwright.passes.lowrank_rewrite import RopeInfo as ReExported


def _tables(cm):
    sg = cm.step_graph
    return sg, [rotary_table(sg, n) for n in schema.attention_nodes(sg.gm)]


def test_gemma3_sliding_and_global_layers_get_their_own_table(compiled_tiny, tiny):
    sg, (local, full) = _tables(compiled_tiny("tiny-gemma3"))
    assert isinstance(local, RopeInfo) and isinstance(full, RopeInfo) and ReExported is RopeInfo
    assert str(local.node.target).endswith("sliding_attention_inv_freq")
    assert str(full.node.target).endswith("full_attention_inv_freq")
    assert local.inv_freq_shape == full.inv_freq_shape == 8 and local.scaling == full.scaling == 1.0
    # bases 1e4 and 1e6: inv_freq[1] = base^(-2/16)
    lo, hi = attr_tensor(sg.gm, str(local.node.target)), attr_tensor(sg.gm, str(full.node.target))
    assert lo[1].item() == pytest.approx(1e4 ** (-2 / 16), rel=1e-5) and hi[1].item() == pytest.approx(1e6 ** (-2 / 16), rel=1e-5)


def test_one_table_models_and_no_rope(compiled_tiny):
    _, (a, b) = _tables(compiled_tiny("tiny-llama"))
    assert a.node.target == b.node.target == "hf.model.rotary_emb.inv_freq"
    _, found = _tables(compiled_tiny("tiny-gpt2"))
    assert all(isinstance(m, NoMatch) and not m and "no rotary table" in m.reason for m in found)


def test_key_norm_found_on_gemma3_only(compiled_tiny, tiny):
    sg = compiled_tiny("tiny-gemma3").step_graph
    m = tiny("tiny-gemma3")
    for layer, n in enumerate(schema.attention_nodes(sg.gm)):
        kn = key_norm(sg, n)
        stored = m.model.layers[layer].self_attn.k_norm.weight.detach()
        assert kn.eps == 1e-6 and kn.target.endswith(f"layers.{layer}.self_attn.k_norm.weight")
        assert torch.equal(kn.weight, 1 + stored.float())
    llama = compiled_tiny("tiny-llama").step_graph
    assert all(key_norm(llama, n) is None for n in schema.attention_nodes(llama.gm))
