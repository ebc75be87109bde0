"""window: exact when the window covers the sequence, sinks + window mask equals an oracle, head splits."""

from __future__ import annotations

import math

import pytest
import torch

from graphwright.capture.ops import ATTENTION, attention_reference
from graphwright.codegen.lower import lower
from graphwright.codegen.torch.attention import attention_sdpa
from graphwright.compiled import CompiledModel
from graphwright.errors import RecipeError
from graphwright.runtime import positions_from_mask
from graphwright.verify import run_recipe
from tests.conftest import left_padded_batch

LENGTHS = [30, 21]


def apply(cm, recipe) -> CompiledModel:
    """``recipe`` run on a copy of cm's captured graph (no re-capture: tiny tests stay fast)."""
    sg, _, _ = run_recipe(cm.step_graph, recipe, verify=False)
    return CompiledModel(sg)


def _run(cm, ids, mask, n=8):
    return cm.logits(ids, mask), cm.generate(ids, max_new_tokens=n, attention_mask=mask, eos_token_id=[])


@pytest.mark.parametrize("name, recipe", [("tiny-llama", "window(size=64)"), ("tiny-llama", "window(size=40, sinks=0, layers=[1])"),
                                          ("tiny-llama", "window(size=64, heads={0: [1], 1: [0, 1]})"),
                                          ("tiny-qwen2", "window(size=38, sinks=4, heads={1: [0, 1, 2]})")])
def test_window_covering_the_sequence_is_identity(compiled_tiny, name, recipe):
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    want_logits, want = _run(compiled_tiny(name), ids, mask)
    got_logits, got = _run(apply(compiled_tiny(name), recipe), ids, mask)
    assert torch.equal(got, want)
    assert (got_logits - want_logits)[mask.bool()].abs().max() <= 1e-5


def _oracle(q, k, v, q_pos, k_pos, scale, size, sinks):
    """Per (b, h, t) loop: keys with 0 <= p <= q_pos and (q_pos - p < size or p < sinks)."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1])
    for b in range(B):
        for h in range(H):
            for t in range(T):
                qp = int(q_pos[b, t])
                cols = [s for s in range(k.shape[2]) if 0 <= k_pos[b, s] <= qp and (qp - k_pos[b, s] < size or k_pos[b, s] < sinks)]
                if qp < 0:
                    continue
                w = torch.softmax(torch.stack([q[b, h, t] @ k[b, h // g, s] for s in cols]) * scale, 0)
                out[b, h, t] = sum(wi * v[b, h // g, s] for wi, s in zip(w, cols))
    return out


@pytest.mark.parametrize("impl", [attention_reference, attention_sdpa])
def test_sinks_window_mask_equals_oracle(impl):
    g = torch.Generator().manual_seed(0)
    B, H, Hk, S, D = 2, 4, 2, 19, 8
    q, k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    pos = torch.arange(S).repeat(B, 1)
    pos[1, :4] = -1
    pos[1, 4:] -= 4
    got = impl(q, k, v, pos, pos, 1 / math.sqrt(D), 5, None, 3)
    want = _oracle(q, k, v, pos, pos, 1 / math.sqrt(D), 5, 3)
    real = pos >= 0
    assert (got - want).permute(0, 2, 1, 3)[real].abs().max() < 1e-5
    # sinks change the result once the window has slid past them
    no_sinks = impl(q, k, v, pos, pos, 1 / math.sqrt(D), 5, None, 0)
    assert (no_sinks - got)[0, :, 10].abs().max() > 1e-3


def _o_proj_input(cm, ids, mask, layer: int) -> torch.Tensor:
    """Layer ``layer``'s attention output [B, T, H*D] (the o_proj input), from the lowered graph."""
    lowered = lower(cm.graph, "torch")
    lin = [n for n in lowered.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
           and f"layers.{layer}.self_attn.o_proj" in str(n.meta.get("nn_module_stack", ""))]
    assert len(lin) == 1
    interp, seen = torch.fx.Interpreter(lowered), {}
    orig = interp.run_node

    def run_node(n):
        if n is lin[0]:
            seen["x"] = interp.env[n.args[0]]
        return orig(n)

    interp.run_node = run_node
    interp.run(ids, positions_from_mask(mask), torch.arange(ids.shape[1]), *cm.step_graph.init_state(ids.shape[0]))
    return seen["x"]


def test_head_split_changes_windowed_heads_only(compiled_tiny):
    """Split heads: unselected heads' outputs are bit-identical to the dense model's; selected ones move."""
    sparse = apply(compiled_tiny("tiny-llama"), "window(size=4, sinks=1, heads={1: [0, 3]})")
    layer1 = [n for n in sparse.graph.graph.nodes if n.target is ATTENTION and n.meta["graphwright"]["layer"] == 1]
    assert sorted(n.meta["graphwright"]["variant"] for n in layer1) == ["dense", "window"]
    assert sparse.step_graph.notes["window"]["per_layer"][1] == {"size": 4, "sinks": 1, "heads": [0, 3]}
    ids, mask = left_padded_batch(256, [24], seed=2)
    x = _o_proj_input(sparse, ids, mask, 1).view(1, 24, 4, 16)
    want = _o_proj_input(compiled_tiny("tiny-llama"), ids, mask, 1).view(1, 24, 4, 16)
    assert torch.equal(x[:, :, [1, 2]], want[:, :, [1, 2]])  # dense heads unchanged
    assert torch.equal(x[:, :4], want[:, :4])  # inside the window nothing changes
    assert (x[:, 8:, [0, 3]] - want[:, 8:, [0, 3]]).abs().max() > 1e-3  # windowed heads changed


@pytest.mark.parametrize("recipe, match", [
    ("window()", "size"),
    ("window(size=0)", "out of range"),
    ("window(size=8, layers=[5])", "out of range"),
    ("window(size=8, heads={0: [9]})", "head 9"),
    ("window(size=8, layers=[0], heads={0: [1]})", "not both"),
])
def test_bad_arguments_raise_recipe_error(compiled_tiny, recipe, match):
    with pytest.raises(RecipeError, match=match):
        apply(compiled_tiny("tiny-llama"), recipe)


def test_model_with_its_own_window_is_refused(compiled_tiny):
    with pytest.raises(RecipeError, match="already has a sliding window"):
        apply(compiled_tiny("tiny-mistral"), "window(size=8)")


@pytest.mark.parametrize("B", [1, 3])
def test_windowed_decode_gathers_only_the_visible_keys(B):
    """One decode query against a long cache: the gathered fast path equals the masked reference."""
    g = torch.Generator().manual_seed(1)
    H, Hk, S, D, window, sinks = 6, 2, 64, 8, 7, 2
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    k_pos = torch.arange(S).repeat(B, 1)
    if B > 1:  # left padding: row 1 has 10 pad columns, row 2 has 40 (fewer visible keys than width)
        for row, pad in ((1, 10), (2, 60)):
            k_pos[row, :pad] = -1
            k_pos[row, pad:] = torch.arange(S - pad)
    q_pos = k_pos[:, -1:]
    for w, s in ((window, sinks), (window, 0)):
        got = attention_sdpa(q, k, v, q_pos, k_pos, 0.3, w, None, s)
        want = attention_reference(q, k, v, q_pos, k_pos, 0.3, w, None, s)
        oracle = _oracle(q, k, v, q_pos, k_pos, 0.3, w, s)
        assert (got - want).abs().max() < 1e-5 and (got - oracle).abs().max() < 1e-5
    dense = attention_sdpa(q, k, v, q_pos, k_pos, 0.3, 0, None, 0)
    assert (dense - got).abs().max() > 1e-3  # the window really cut keys
