"""gemfilter: keep >= length is exact; kept ids equal a naive reference from the HF model's own q/k."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from graphwright.compiled import CompiledModel
from graphwright.errors import RecipeError
from graphwright.runtime.gemfilter import gemfilter_select, truncate_after_layer
from graphwright.verify import run_recipe
from tests.conftest import hf_positions, left_padded_batch

LENGTHS = [40, 29]


def apply(cm, recipe) -> CompiledModel:
    """``recipe`` run on a copy of cm's captured graph (no re-capture: tiny tests stay fast)."""
    sg, _, _ = run_recipe(cm.step_graph, recipe, verify=False)
    return CompiledModel(sg)


def test_keep_covering_the_prompt_is_identity(compiled_tiny):
    base = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    want = base.generate(ids, max_new_tokens=10, attention_mask=mask, eos_token_id=[])
    cm = apply(base, "gemfilter(layer=1, keep=40)")
    assert torch.equal(cm.generate(ids, max_new_tokens=10, attention_mask=mask, eos_token_id=[]), want)
    assert cm.last_stats["gemfilter"]["kept_tokens"] == LENGTHS


@torch.no_grad()
def _naive_kept(model, ids, mask, layer: int, keep: int, kernel: int = 5) -> list:
    """Reference from the HF model: hook q_proj/k_proj of layer r, apply RoPE, loop over heads and tokens."""
    attn = model.model.layers[layer].self_attn
    cfg = model.config
    H, Hk, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    got = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))]
    try:
        model(ids, attention_mask=mask, position_ids=hf_positions(mask))
    finally:
        for h in hooks:
            h.remove()
    B, T = ids.shape
    q = got["q"].view(B, T, H, D).transpose(1, 2)
    k = got["k"].view(B, T, Hk, D).transpose(1, 2)
    cos, sin = model.model.rotary_emb(q, hf_positions(mask))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out = []
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        scores = [sum(float(q[b, h, -1] @ k[b, h // (H // Hk), t]) for h in range(H)) for t in real]
        n, r = len(scores), kernel // 2
        pooled = [sum(scores[j] for j in range(i - r, i + r + 1) if 0 <= j < n) / kernel for i in range(n)]
        best = sorted(range(n), key=lambda i: -pooled[i])[:keep]
        out.append(sorted(real[i] for i in best))
    return out


@pytest.mark.parametrize("layer, keep", [(0, 7), (1, 12)])
def test_kept_ids_equal_naive_reference(tiny, compiled_tiny, layer, keep):
    cm = apply(compiled_tiny("tiny-llama"), f"gemfilter(layer={layer}, keep={keep})")
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    kept = gemfilter_select(cm, ids, mask)
    assert [k.tolist() for k in kept] == _naive_kept(tiny("tiny-llama"), ids, mask, layer, keep)


def test_generation_runs_on_kept_tokens_with_fresh_positions(compiled_tiny):
    base = compiled_tiny("tiny-llama")
    cm = apply(base, "gemfilter(layer=0, keep=9)")
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    out = cm.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    kept = gemfilter_select(cm, ids, mask)
    for b in range(2):
        short = ids[b, kept[b]][None]
        want = base.generate(short, max_new_tokens=6, eos_token_id=[])  # positions 0..8
        assert torch.equal(out[b, ids.shape[1]:], want[0, 9:])
    assert torch.equal(out[:, :ids.shape[1]], ids)


def test_truncated_graph_has_no_later_layer(compiled_tiny):
    gm = truncate_after_layer(compiled_tiny("tiny-llama").graph, 0)
    mods = " ".join(str(n.meta.get("nn_module_stack", "")) for n in gm.graph.nodes)
    assert "layers.0" in mods and "layers.1" not in mods and "lm_head" not in mods
    assert not any(n.op == "call_function" and "attention" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("recipe, match", [
    ("gemfilter(layer=2)", "out of range"),
    ("gemfilter(keep=0)", "out of range"),
    ("gemfilter(kernel=4)", "odd"),
    ("gemfilter(layer=0) + gemfilter(layer=1)", "once"),
])
def test_bad_arguments_raise_recipe_error(compiled_tiny, recipe, match):
    with pytest.raises(RecipeError, match=match):
        apply(compiled_tiny("tiny-llama"), recipe)
