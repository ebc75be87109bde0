"""cache_append: the torch backend's in-place ``cat([cache, new], dim)`` for state inputs."""

import torch

from graphwright.codegen.lower import lower
from graphwright.codegen.torch.cache_append import cache_append


def test_appends_in_place_and_equals_cat():
    g = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, 3, 0, 4)
    want = cache
    ptrs = set()
    for step in range(200):  # crosses several regrowths
        new = torch.randn(2, 3, 7 if step == 0 else 1, 4, generator=g)
        cache, want = cache_append(cache, new, 2), torch.cat([want, new], 2)
        assert torch.equal(cache, want)
        ptrs.add(cache.data_ptr())
    assert len(ptrs) < 20  # regrown geometrically, not copied every step
    assert cache.shape == (2, 3, 206, 4)


def test_older_views_never_change():
    """A second continuation from an older view copies; what a caller holds stays as it was."""
    first = cache_append(torch.zeros(1, 0), torch.arange(5.0)[None], 1)
    kept = first.clone()
    a = cache_append(first, torch.tensor([[10.0]]), 1)  # in place, past first's end
    b = cache_append(first, torch.tensor([[20.0]]), 1)  # first is no longer the newest view: copy
    assert a.data_ptr() == first.data_ptr() and b.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)
    assert a.tolist() == [[0, 1, 2, 3, 4, 10]] and b.tolist() == [[0, 1, 2, 3, 4, 20]]
    c = cache_append(a, torch.tensor([[11.0]]), -1)  # negative dim
    assert c.tolist() == [[0, 1, 2, 3, 4, 10, 11]] and a.tolist() == [[0, 1, 2, 3, 4, 10]]


def test_foreign_caches_and_dtype_promotion_behave_like_cat():
    cache = torch.randn(2, 5, 3)  # not made by cache_append (e.g. an eviction pass's output)
    new = torch.randn(2, 1, 3)
    out = cache_append(cache, new, 1)
    assert torch.equal(out, torch.cat([cache, new], 1)) and out.data_ptr() != cache.data_ptr()
    mixed = cache_append(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 1), 1)
    assert torch.equal(mixed, torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 1)], 1))


def test_lowering_uses_it_for_state_inputs_only(compiled_tiny):
    gm = compiled_tiny("tiny-llama").step_graph.gm
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    torch_gm, ref_gm = lower(gm, "torch"), lower(gm, "reference")
    appends = [n for n in torch_gm.graph.nodes if n.target is cache_append]
    # key positions + K and V of each layer
    assert len(appends) == 1 + 2 * 2 and all(n.args[0].name in placeholders for n in appends)
    assert not any(n.target is cache_append for n in ref_gm.graph.nodes)


def test_unpadded_prefill_uses_is_causal_and_equals_reference():
    """A fresh unpadded prompt takes SDPA's is_causal path (no mask tensor); same values as the
    reference. Padding, a cached prefix or a single token keep the mask path."""
    from graphwright.capture.ops import attention_reference
    from graphwright.codegen.torch.attention import _plain_causal, attention_sdpa

    g = torch.Generator().manual_seed(1)
    B, H, Hk, T, D = 2, 6, 2, 9, 8
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g)
    pos = torch.arange(T)[None].expand(B, T)
    assert _plain_causal(pos, pos, T, T)
    assert torch.allclose(attention_sdpa(q, k, v, pos, pos, 0.3), attention_reference(q, k, v, pos, pos, 0.3), atol=1e-5)
    padded = torch.cat([torch.full((B, 1), -1), pos[:, :-1]], 1)
    assert not _plain_causal(padded, padded, T, T) and not _plain_causal(pos[:, -1:], pos, 1, T)
    assert not _plain_causal(pos[:, -4:], pos, 4, T)


def test_prompt_with_per_head_positions_shares_one_mask(monkeypatch):
    """Per-head key positions that agree across KV heads (a fresh prompt under an eviction pass)
    take the plain causal path, not a [B, H, T, T] mask (2.4 GB per layer at 8k tokens on SmolLM2);
    positions that differ by head keep the per-head mask. Both equal the reference."""
    import graphwright.codegen.torch.attention as att
    from graphwright.capture.ops import attention_reference

    g = torch.Generator().manual_seed(2)
    B, H, Hk, T, D = 2, 6, 2, 7, 8
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g)
    pos = torch.arange(T)[None].expand(B, T)
    per_head = pos[:, None].expand(B, Hk, T).clone()
    ref = attention_reference(q, k, v, pos, per_head, 0.3)
    built = []
    monkeypatch.setattr(att, "visible_mask", lambda *a, **kw: built.append(a) or visible_mask(*a, **kw))
    from graphwright.capture.ops import visible_mask
    assert torch.allclose(att.attention_sdpa(q, k, v, pos, per_head, 0.3), ref, atol=1e-5) and not built
    differ = per_head.clone()
    differ[:, 1, 3] = -1  # head 1 has lost its fourth key
    out = att.attention_sdpa(q, k, v, pos, differ, 0.3)
    assert len(built) == 1 and built[0][1].shape == (B, Hk, T)
    assert torch.allclose(out, attention_reference(q, k, v, pos, differ, 0.3), atol=1e-5)
