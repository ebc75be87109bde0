"""fuse_moe: one fused op per MoE block, exact against transformers (routing bit-equal, outputs 1e-5)."""

import functools
import operator

import pytest
import torch

import graphwright as gw
import graphwright.passes.fuse_moe  # noqa: F401  (registers the pass until passes/__init__ imports it)
from graphwright.capture.ops import MOE_EXPERTS, moe_experts_reference
from graphwright.codegen.lower import lower
from graphwright.codegen.torch.moe import _padded_groups, fused_moe_sorted, moe_experts_sorted
from graphwright.compiled import CompiledModel
from graphwright.ops.fused_moe import FUSED_MOE, fused_moe_reference
from graphwright.passes.base import PassContext
from graphwright.passes.fuse_moe import FuseMoE
from tests.conftest import hf_positions, left_padded_batch

MOE_MODELS = {"tiny-mixtral": ("gate", "mixtral"), "tiny-phimoe": ("router", "sparsemixer"),
              "tiny-qwen2moe": ("gate", "qwen2_moe")}


@functools.lru_cache(maxsize=None)
def _fused(name):
    """(HF model, identity CompiledModel, fused CompiledModel) for a tiny MoE model."""
    model, _ = gw.load_model(name)
    cm = gw.compile(model)
    sg = FuseMoE(impl="sorted").run(cm.step_graph.copy(), PassContext(model=model))
    return model, cm, CompiledModel(sg)


def _block_args(block, attr, kind):
    router = getattr(block, attr)
    return (router.weight, None, block.experts.gate_up_proj, block.experts.down_proj, kind, router.top_k, "silu",
            float(getattr(router, "router_jitter_noise", 0.0)), bool(getattr(router, "norm_topk_prob", True)))


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_graph_is_rewritten(name):
    model, cm, fused = _fused(name)
    sg = fused.step_graph
    nodes = sg.nodes(FUSED_MOE)
    assert len(nodes) == model.config.num_hidden_layers and not sg.nodes(MOE_EXPERTS)
    assert not [n for n in sg.nodes(torch.ops.aten.topk.default)]  # router nodes are gone
    assert all(n.meta["graphwright"]["variant"] == "fused_moe" for n in nodes)
    note = sg.notes["fuse_moe"]
    kind = MOE_MODELS[name][1]
    assert note["counts"] == {"fused": 2}
    assert note["per_layer"] == {layer: {"router": kind, "experts": 4, "top_k": 2} for layer in (0, 1)}
    sg.gm.graph.lint()
    assert "moe_experts" in str(cm.step_graph.gm.graph)  # the pass ran on a copy


@pytest.mark.parametrize("impl", [fused_moe_reference, fused_moe_sorted], ids=["reference", "torch"])
@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_fused_op_matches_hf_block(name, impl):
    model, _, _ = _fused(name)
    attr, kind = MOE_MODELS[name]
    block = model.model.layers[1].mlp
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = block(hidden).view(-1, 64)
        flat = hidden.view(-1, 64)
        got, logits = impl(flat, *_block_args(block, attr, kind))
        if name == "tiny-qwen2moe":  # the shared expert stays outside the fused op (ordinary graph nodes)
            got = got + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
        want_logits = getattr(block, attr)(flat)[0]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits, want_logits)


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_logits_match_hf(name):
    model, cm, fused = _fused(name)
    ids, mask = left_padded_batch(256, [12, 8, 5], seed=1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = fused.logits(ids, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-5
    assert (got[real] - cm.logits(ids, mask)[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(MOE_MODELS))
@pytest.mark.parametrize("lengths", [[10], [14, 9, 3]], ids=["batch1", "batch3-ragged"])
def test_greedy_tokens_match_hf(name, lengths):
    model, _, fused = _fused(name)
    ids, mask = left_padded_batch(256, lengths, seed=2)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = fused.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, want)


def _weights(E=6, d=32, inter=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * inter, d, generator=g) * 0.2).to(dtype), (torch.randn(E, d, inter, generator=g) * 0.2).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "sparsemixer"])
@pytest.mark.parametrize("n", [1, 7, 130, 300])  # 300 tokens x top-2 >= ROW_MAJOR_MIN_PAIRS: the prefill path
def test_torch_backend_equals_reference(kind, n, dtype, tol):
    gate_up, down = _weights(dtype=dtype)
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 32, generator=g).to(dtype)
    rw = torch.randn(6, 32, generator=g).to(dtype)
    args = (hidden, rw, None, gate_up, down, kind, 2, "silu", 0.01, True)
    want, want_logits = fused_moe_reference(*args)
    got, logits = fused_moe_sorted(*args)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(logits, want_logits)
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


def test_empty_experts_and_all_on_one_expert():
    gate_up, down = _weights(E=6)
    hidden = torch.randn(20, 32, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[0, 1]] * 20)  # experts 2..5 empty
    w = torch.rand(20, 2, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(moe_experts_sorted(hidden, idx, w, gate_up, down, "silu"),
                          moe_experts_reference(hidden, idx, w, gate_up, down, "silu"), atol=1e-5)
    one = torch.full((20, 1), 3)  # top-1, every token on expert 3
    assert torch.allclose(moe_experts_sorted(hidden, one, w[:, :1], gate_up, down, "silu"),
                          moe_experts_reference(hidden, one, w[:, :1], gate_up, down, "silu"), atol=1e-5)
    # through the fused op: a router whose expert-4 row dominates sends every token there first
    rw = torch.zeros(6, 32)
    rw[4] = 5.0  # positive hidden: logit 4 > 0 = every other logit
    args = (hidden.abs(), rw, None, gate_up, down, "mixtral", 1, "silu", 0.0, True)
    got, logits = fused_moe_sorted(*args)
    assert (logits.argmax(-1) == 4).all()
    assert torch.allclose(got, fused_moe_reference(*args)[0], atol=1e-5)


@pytest.mark.parametrize("row_major", [False, True], ids=["weight-stationary", "row-major"])
@pytest.mark.parametrize("d", [32, 33], ids=["grouped_mm", "unaligned-loop"])
def test_padded_expert_groups(d, row_major, monkeypatch):
    """Groups are padded with zero columns to 16-byte multiples (weight-stationary regime); an odd
    hidden size (strides not 16-byte aligned) takes the per-expert loop instead of
    torch._grouped_mm, in both GEMM layouts. All equal the loop."""
    import graphwright.codegen.torch.moe as moe

    monkeypatch.setattr(moe, "ROW_MAJOR_MIN_PAIRS", 0 if row_major else 10**9)
    g = torch.Generator().manual_seed(d)
    gate_up, down = torch.randn(5, 2 * 24, d, generator=g) * 0.2, torch.randn(5, d, 24, generator=g) * 0.2
    hidden = torch.randn(11, d, generator=g)
    idx = torch.tensor([[0, 2]] * 6 + [[2, 4]] * 4 + [[4, 1]])  # groups of 6, 1, 11, 0, 4 pairs
    w = torch.rand(11, 2, generator=g)
    got = moe_experts_sorted(hidden, idx, w, gate_up, down, "silu")
    assert torch.allclose(got, moe_experts_reference(hidden, idx, w, gate_up, down, "silu"), atol=1e-5)
    assert _padded_groups(torch.tensor([6, 1, 11, 0, 4]), torch.float32).tolist() == [8, 4, 12, 0, 4]
    assert _padded_groups(torch.tensor([1, 9, 0]), torch.float16).tolist() == [8, 16, 0]


@pytest.mark.parametrize("d", [32, 33], ids=["split-bmm", "odd-rows"])
@pytest.mark.parametrize("n", [1, 2])
def test_single_token_expert_path(d, n):
    """One token per hit expert (decode): each expert's weights go through split bmm (row chunks
    on parallel threads; plain matmul when the rows do not split evenly). Equal to the loop."""
    import graphwright.codegen.torch.moe as moe

    g = torch.Generator().manual_seed(n)
    gate_up, down = torch.randn(5, 48, d, generator=g) * 0.2, torch.randn(5, d, 24, generator=g) * 0.2
    hidden = torch.randn(n, d, generator=g)
    idx = torch.tensor([[3, 1], [2, 0]])[:n]  # every expert gets at most one token
    w = torch.rand(n, 2, generator=g)
    got = moe_experts_sorted(hidden, idx, w, gate_up, down, "silu")
    assert torch.allclose(got, moe_experts_reference(hidden, idx, w, gate_up, down, "silu"), atol=1e-5)
    col = torch.randn(d, 1, generator=g)  # a contiguous column is re-laid out as a row, same product
    assert torch.allclose(moe._split_matvec(gate_up[0], col), gate_up[0] @ col[:, 0], atol=1e-5)


def test_decode_single_token_and_empty_batch():
    gate_up, down = _weights()
    rw = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    for n in (1, 0):
        hidden = torch.randn(n, 32)
        args = (hidden, rw, None, gate_up, down, "sparsemixer", 2, "silu", 0.01, False)
        got, logits = fused_moe_sorted(*args)
        assert got.shape == (n, 32) and logits.shape == (n, 6)
        assert torch.allclose(got, fused_moe_reference(*args)[0], atol=1e-5)


def test_lowering_honours_impl():
    _, _, fused = _fused("tiny-mixtral")
    lowered = lower(fused.step_graph.gm, "torch")
    targets = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    assert fused_moe_sorted in targets and FUSED_MOE not in targets
    assert fused_moe_reference in {n.target for n in lower(fused.step_graph.gm, "reference").graph.nodes}


def test_recipe_runs_with_verification():
    model, _, _ = _fused("tiny-phimoe")
    cm = gw.compile(model, recipe="fuse_moe(impl=sorted)")
    record = cm.verification["passes"][0]
    assert record["exact"] and record["max_abs_logit_diff"] <= 1e-5
    assert cm.step_graph.notes["fuse_moe"]["counts"]["fused"] == 2


def test_does_not_apply_to_dense_model(tiny):
    sg = gw.compile(tiny("tiny-llama")).step_graph
    reason = FuseMoE().applies_to(sg)
    assert reason and "no MoE blocks" in reason and "LlamaForCausalLM" in reason


def test_unrecognised_router_names_the_module():
    """A router whose semantics differ from every known kind (here: Mixtral without renormalising
    and with fp32 weights kept) is refused, not fused wrongly."""
    _, cm, _ = _fused("tiny-mixtral")
    sg = cm.step_graph.copy()
    div = next(n for n in sg.gm.graph.nodes if n.target is torch.ops.aten.div_.Tensor)
    div.replace_all_uses_with(div.args[0])
    sg.gm.graph.erase_node(div)
    sg.gm.graph.erase_node(next(n for n in sg.gm.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList))
    reason = FuseMoE().applies_to(sg)
    assert reason and "model.layers.0.mlp" in reason and "not recognised" in reason


def test_fused_node_outputs_are_getitems():
    _, _, fused = _fused("tiny-qwen2moe")
    for node in fused.step_graph.nodes(FUSED_MOE):
        assert {u.target for u in node.users} <= {operator.getitem}
        assert node.args[5] == "qwen2_moe" and node.args[9] is False


@pytest.mark.slow
def test_smollm2_moe_exact():
    model, tok = gw.load_model("smollm2-135m-moe")
    cm = gw.compile(model, tokenizer=tok)
    sg = FuseMoE(impl="sorted").run(cm.step_graph.copy(), PassContext(model=model))
    assert sg.notes["fuse_moe"]["counts"]["fused"] == 30
    fused = CompiledModel(sg, tokenizer=tok)
    ids = tok(["The quick brown fox jumps over", "Once upon a time"], return_tensors="pt", padding=True,
              padding_side="left")
    got = fused.logits(ids.input_ids, ids.attention_mask)
    want = cm.logits(ids.input_ids, ids.attention_mask)
    real = ids.attention_mask.bool()
    # fp32 1e-5 relative to the logits' scale (~30): 30 layers of GEMMs summed in another order.
    # transformers' own eager and grouped_mm experts paths differ by 8e-5 on these logits.
    scale = want[real].abs().max().item()
    assert (got[real] - want[real]).abs().max().item() <= 1e-5 * scale
    a = fused.generate(ids.input_ids, attention_mask=ids.attention_mask, max_new_tokens=16, eos_token_id=[])
    b = cm.generate(ids.input_ids, attention_mask=ids.attention_mask, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(a, b)
