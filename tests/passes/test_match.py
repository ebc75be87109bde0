"""match.rotary_table: each attention layer's own rotary table; key_norm: the RMSNorm on the key path;
layer_site / cache_concat: the one layer-site and cache-concatenation matchers."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops import schema
from graphwright.passes.lowrank_rewrite import RopeInfo as ReExported
from graphwright.passes.match import NoMatch, RopeInfo, attr_tensor, key_norm, rotary_table


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


def test_layer_site_and_cache_concat_on_dense_and_latent_layers(compiled_tiny):
    from graphwright.ops.graph_match import CacheConcat, cache_concat
    from graphwright.passes.match import LayerSite, layer_site

    sg = compiled_tiny("tiny-llama").step_graph
    for layer, n in enumerate(schema.attention_nodes(sg.gm)):
        site = layer_site(sg, n)
        assert isinstance(site, LayerSite) and site.layer == layer and not site.latent
        assert (site.k_name, site.v_name) == (f"k{layer}", f"v{layer}") and site.module.endswith(f"layers.{layer}.self_attn")
        m = cache_concat(schema.get(n, "k"), 2)
        assert isinstance(m, CacheConcat) and m.cat is site.k_cat and m.cache is site.k_cache and m.new is site.k_new
        assert m.cache.op == "placeholder" and m.dim == 2
        miss = cache_concat(schema.get(n, "k"), 1)  # right shape, wrong dimension
        assert not miss and "dim 2, not 1" in miss.reason
        assert not cache_concat(n) and "is not an aten cat" in cache_concat(n).reason


def test_layer_site_on_latent_layers(tiny):
    import graphwright as gw
    from graphwright.passes.match import layer_site

    cm = gw.compile(tiny("tiny-llama"), recipe="lowrank_kv(keep=0.5)")
    sg = cm.step_graph
    for n in schema.attention_nodes(sg.gm):
        site = layer_site(sg, n)
        r_k = next(s for s in sg.state if s.name == site.k_name).shape[-1]
        assert site.latent and site.k_name.endswith("_latent") and site.latent_k_width == r_k > 0
        assert site.k_cat is schema.get(n, "c_k") and site.v_cat is schema.get(n, "c_v")
