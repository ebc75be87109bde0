"""Triton fused-MoE grouped GEMMs against transformers' experts loop (``moe_experts_reference``)."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.capture.ops import moe_experts_reference
from graphwright.codegen.triton import fused_moe_triton
from graphwright.compiled import CompiledModel
from graphwright.ops.fused_moe import fused_moe_reference
from tests.conftest import left_padded_batch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # max error relative to the output's max magnitude


def _experts(E, d, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * inter, d, generator=g) / d ** 0.5).to(dtype), \
        (torch.randn(E, d, inter, generator=g) / inter ** 0.5).to(dtype)


ROUTINGS = {  # name -> index [N, k] builder for E = 4 experts
    "random": lambda N, g: torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(N)]),
    "empty_experts": lambda N, g: torch.tensor([[1, 3]] * N),  # experts 0 and 2 get no token
    "one_expert": lambda N, g: torch.tensor([[2, 0]] * N),  # every token's first choice is expert 2
}


def _check(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err <= TOL[ref.dtype], f"relative max error {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("N", [1, 21])
def test_experts_match_reference(N, routing, dtype):
    from graphwright.codegen.triton.moe import moe_experts_triton

    g = torch.Generator().manual_seed(N)
    gate_up, down = _experts(4, 24, 40, dtype)
    hidden = torch.randn(N, 24, generator=g).to(dtype)
    index = ROUTINGS[routing](N, g)
    weights = torch.softmax(torch.randn(N, 2, generator=g), -1)  # fp32 weights, as Mixtral's
    ref = moe_experts_reference(hidden, index, weights, gate_up, down, "silu")
    out = moe_experts_triton(hidden, index, weights, gate_up, down, "silu", block_m=16, block_n=16, block_k=16)
    _check(out, ref)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_activations_match_reference(act):
    from graphwright.codegen.triton.moe import moe_experts_triton

    g = torch.Generator().manual_seed(1)
    gate_up, down = _experts(4, 16, 16, torch.float32)
    hidden = torch.randn(9, 16, generator=g)
    index = ROUTINGS["random"](9, g)
    weights = torch.rand(9, 2, generator=g)
    ref = moe_experts_reference(hidden, index, weights, gate_up, down, act)
    _check(moe_experts_triton(hidden, index, weights, gate_up, down, act, block_n=16, block_k=16), ref)


@pytest.mark.parametrize("router, top_k", [("mixtral", 2), ("qwen2_moe", 2), ("sparsemixer", 2)])
def test_fused_op_matches_reference_routing_and_output(router, top_k):
    g = torch.Generator().manual_seed(2)
    gate_up, down = _experts(4, 16, 16, torch.float16)
    hidden = torch.randn(7, 16, generator=g).half()
    rw = torch.randn(4, 16, generator=g).half()
    args = (hidden, rw, None, gate_up, down, router, top_k, "silu", 0.01, True)
    ref_out, ref_logits = fused_moe_reference(*args)
    out, logits = fused_moe_triton(*args)
    assert torch.equal(logits, ref_logits)
    _check(out, ref_out)


@pytest.mark.interpreter_only
def test_tiny_mixtral_triton_backend_matches_torch_tokens(tiny):
    cm = gw.compile(tiny("tiny-mixtral"), recipe="fuse_moe", verify=False)
    tc = CompiledModel(cm.step_graph, recipe=cm.recipe, backend="triton")
    assert fused_moe_triton in {n.target for n in tc._lowered.graph.nodes if n.op == "call_function"}
    ids, mask = left_padded_batch(cm.info.vocab_size, [9, 6], seed=1)
    want = cm.generate(ids, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(tc.generate(ids, max_new_tokens=5, attention_mask=mask), want)
