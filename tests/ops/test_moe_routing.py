"""Routing functions are bit-equal to transformers' own routers (indices, weights and dtypes)."""

import copy

import pytest
import torch
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from graphwright.ops.moe_routing import route, route_sparsemixer

# (model, router module attribute in the sparse-moe block, router kind)
ROUTERS = [("tiny-mixtral", "gate", "mixtral"), ("tiny-phimoe", "router", "sparsemixer"), ("tiny-qwen2moe", "gate", "qwen2_moe")]


def _route_kwargs(router):
    return dict(top_k=router.top_k, jitter_eps=getattr(router, "router_jitter_noise", 0.0),
                norm_topk_prob=getattr(router, "norm_topk_prob", True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,attr,kind", ROUTERS)
def test_routing_bit_equal_to_hf_router(name, attr, kind, dtype, tiny):
    router = copy.deepcopy(getattr(tiny(name).model.layers[0].mlp, attr)).to(dtype)  # the shared model stays fp32
    g = torch.Generator().manual_seed(3)
    hidden = (torch.randn(97, router.weight.shape[1], generator=g) * 2).to(dtype)
    with torch.no_grad():
        _, want_w, want_i = router(hidden)
        got_w, got_i = route(kind, torch.nn.functional.linear(hidden, router.weight), **_route_kwargs(router))
    assert torch.equal(got_i, want_i)
    assert got_w.dtype == want_w.dtype
    assert torch.equal(got_w, want_w)
    assert got_i.unique().numel() > 1  # the probe really exercises several experts


def test_qwen2moe_norm_topk_prob_true():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = Qwen2MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)
    router = Qwen2MoeTopKRouter(cfg).eval()
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, want_w, want_i = router(hidden)
        got_w, got_i = route("qwen2_moe", logits, 3, norm_topk_prob=True)
    assert torch.equal(got_i, want_i) and torch.equal(got_w, want_w)
    assert torch.allclose(got_w.sum(-1), torch.ones(40))


def _near_tie_cases():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 8, generator=g)
    top = base.max(-1, keepdim=True).values
    near = base.clone()
    near[:, 3] = top[:, 0] - top[:, 0].abs() * 0.02 * torch.rand(64, generator=g)  # within 2% of the max
    neg = -base.abs() - 0.05  # negative maxima
    zeros = -torch.rand(16, 8, generator=g)
    zeros[:, 2] = 0.0  # zero score with m <= 0: 0/0 = NaN, which compares False (not masked)
    zeros[:8, 5] = 0.0  # exact tie at zero
    paper = torch.tensor([[2.00, 1.99, 1.5, 0.3, -1.0, 0.0, 0.2, 0.1]])
    return torch.cat([base, near, neg, zeros, torch.zeros(2, 8), paper])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_sparsemixer_near_ties_bit_equal(dtype):
    scores = _near_tie_cases().to(dtype)
    want_w, want_i = sparsemixer(scores.clone(), jitter_eps=0.01, training=False)
    got_w, got_i = route_sparsemixer(scores.clone(), 0.01)
    assert torch.equal(got_i, want_i)
    assert got_w.dtype == want_w.dtype == dtype
    assert torch.equal(got_w, want_w)
    assert not got_w.isnan().any()


def test_sparsemixer_paper_example():
    """ALGORITHMS.md: logits (2.00, 1.99, 1.5, ...) give w = (0.5025, 1.0); far logits give 1.0."""
    w, i = route_sparsemixer(torch.tensor([[2.00, 1.99, 1.5, 0.3], [3.0, 1.0, 0.0, -1.0]]), 0.01)
    assert i.tolist() == [[0, 1], [0, 1]]
    assert w[0, 0].item() == pytest.approx(0.5025, abs=1e-4) and w[0, 1].item() == 1.0
    assert w[1].tolist() == [1.0, 1.0]


def test_sparsemixer_is_top2_only():
    with pytest.raises(ValueError, match="top-2"):
        route_sparsemixer(torch.zeros(1, 4), 0.01, top_k=3)


def test_unknown_router():
    with pytest.raises(ValueError, match="known: mixtral"):
        route("switch", torch.zeros(1, 4), 1)
