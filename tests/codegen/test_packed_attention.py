"""Torch-backend decode attention over the packed Ada-KV cache (``codegen/torch/packed_attention.py``).

The lowered graph of a packed recipe attends over the appended packed buffer (no expand-``cat`` copy per layer);
its logits and greedy tokens equal the reference backend's; the op equals ``attention_reference`` on the wide view.
"""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.capture.ops import attention_reference
from graphwright.codegen.lower import lower
from graphwright.codegen.torch.packed_attention import attention_packed
from graphwright.ops.adakv_ref import pack_heads_reference, packed_positions_reference
from tests.conftest import _tiny, left_padded_batch
from tests.passes.eviction_helpers import decode_loop, random_headset

RECIPES = ['snapkv(budget=8, window=2, heads="adaptive", floor=0.0)', "snapkv(budget=8, window=2, pyramid=20.0)",
           'evict(score="h2o", rule="adaptive", budget=8, when="decode")']


def _wide_cats(gm) -> int:
    """aten cats whose first part is an expand of a state (the graph's wide view of a packed cache)."""
    return sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default
               and getattr(n.args[0][0], "target", None) is torch.ops.aten.expand.default
               and n.args[0][0].args[0].op == "placeholder")


@pytest.mark.parametrize("recipe", [*RECIPES, "scores"])
def test_packed_decode_equals_the_reference_backend(recipe, tmp_path):
    model = _tiny("tiny-llama")
    if recipe == "scores":
        path, _ = random_headset(gw.compile(model, verify=False).step_graph.info, tmp_path, 1, zero_below=0.4)
        recipe = f'snapkv(budget=8, window=2, heads="scores", gamma=3.0, headset="{path}")'
    torch_cm = gw.compile(model, recipe=recipe, verify=False)
    ref_cm = gw.compile(model, recipe=recipe, backend="reference", verify=False)
    layers = torch_cm.step_graph.info.num_layers
    assert sum(1 for n in torch_cm._lowered.graph.nodes if n.target is attention_packed) == layers
    assert _wide_cats(torch_cm._lowered) == 0 and _wide_cats(lower(torch_cm.step_graph.gm, "reference")) == 2 * layers
    ids, mask = left_padded_batch(256, [26, 15], seed=5)
    got_logits, got_tokens, _ = decode_loop(torch_cm, ids, mask, 16)
    want_logits, want_tokens, _ = decode_loop(ref_cm, ids, mask, 16)
    assert torch.equal(got_tokens, want_tokens)
    assert (got_logits - want_logits).abs().max() <= 1e-4


def _packed_case(seed, B=2, hk=2, g=3, D=8, n=(7, 5), T=1):
    """A packed layer: k_cache [B, 1, N, D] with per-head positions (ragged heads, -1 padding slots), this step's
    T new tokens per head, and the appended packed buffers the torch backend hands the attention."""
    gen = torch.Generator().manual_seed(seed)
    N = hk * max(n) + 2
    k_cache, v_cache = torch.randn(B, 1, N, D, generator=gen), torch.randn(B, 1, N, D, generator=gen)
    kp_cache = torch.full((B, hk, N), -1, dtype=torch.long)
    for b in range(B):
        slots = torch.randperm(N, generator=gen)
        for h in range(hk):
            take = slots[h * max(n):h * max(n) + n[(b + h) % len(n)]]
            kp_cache[b, h, take] = torch.randperm(20, generator=gen)[:len(take)]
    q_pos = torch.arange(20, 20 + T).repeat(B, 1)
    q = torch.randn(B, hk * g, T, D, generator=gen)
    k_new, v_new = torch.randn(B, hk, T, D, generator=gen), torch.randn(B, hk, T, D, generator=gen)
    k_all = torch.cat([k_cache, pack_heads_reference(k_new)], 2)
    v_all = torch.cat([v_cache, pack_heads_reference(v_new)], 2)
    kp_all = torch.cat([kp_cache, packed_positions_reference(q_pos, hk)], 2)
    wide = (torch.cat([k_cache.expand(-1, hk, -1, -1), k_new], 2), torch.cat([v_cache.expand(-1, hk, -1, -1), v_new], 2),
            torch.cat([kp_cache, q_pos[:, None].expand(-1, hk, -1)], 2))
    parts = dict(k_cache=k_cache, k_new=k_new, v_cache=v_cache, v_new=v_new, kp_cache=kp_cache)
    return q, q_pos, (k_all, v_all, kp_all), wide, parts


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_op_equals_the_reference_on_the_wide_view(seed, T):
    q, q_pos, (k_all, v_all, kp_all), (kw, vw, kpw), parts = _packed_case(seed, T=T)
    want = attention_reference(q, kw, vw, q_pos, kpw, 0.3)
    got = attention_packed(q, k_all, v_all, q_pos, kp_all, 0.3, **parts)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5
