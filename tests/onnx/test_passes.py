"""ONNX checks beyond the registry suite (``test_registry_onnx.py``: every registered pass and issue
16's compositions give the torch runtime's greedy tokens in ONNX Runtime).

For the registry's cases (``tests/passes/backend_cases.py``; the artifacts are shared through
``conftest.py``): the artifact passes onnx.checker (full), holds the expected ONNX op types, lists
the expected runtime ops, and eviction really shrinks the cache (so token equality is not the
trivial dense case). StreamingLLM and H2O with token budgets evict in the graph at every step
(``prompt_slots.py``, ``decode_slots.py``); the other eviction policies' prompt steps run as a
graph/runtime split (``codegen/onnx/split.py``).
``CASES`` keeps the hand-picked settings the registry does not cover, with the same checks and a
longer generation (30 + 24 tokens) compared against the torch runtime.
"""

import json

import onnx
import pytest
import torch

import graphwright as gw
from graphwright.cli.cmd_demo import DEMO_RECIPE
from tests.conftest import _compiled, left_padded_batch
from tests.onnx.kv_compare import assert_onnx_cache_like_torch
from tests.passes.backend_cases import backend_cases

# registry case id: (ONNX op types that must appear, runtime ops, cache evicted)
REGISTRY_CHECKS = {
    "lowrank_kv": ({"Attention", "MatMul"}, set(), False),
    "steer": ({"Attention", "GatherElements"}, set(), False),
    "fuse_moe": ({"TopK", "ScatterND"}, set(), False),
    "h2o": ({"Attention", "TopK"}, set(), True),
    "snapkv": ({"Attention", "TopK"}, set(), True),
    "streaming": ({"Attention", "CumSum", "TopK"}, set(), True),
    "fastgen": ({"Attention"}, {"graphwright::evict_fastgen"}, True),
    # block selection in the graph (TopK over block scores -> additive mask); every layer sparse, 4-token blocks
    "block_sparse": ({"Attention", "TopK", "ReduceMin"}, set(), False),
    "window": ({"Attention"}, set(), False),
    "lowrank_kv+block_sparse": ({"Attention", "TopK", "ReduceMin", "MatMul"}, set(), False),
    "lowrank_kv+streaming": ({"Attention", "CumSum"}, {"graphwright::evict_streaming"}, True),
    "h2o+steer": ({"Attention", "GatherElements", "TopK"}, set(), True),
    # eviction over latent caches: keys rebuilt in the graph (latent_keys), the shared payload
    # selected and sliced into c_k / c_v after the runtime op ("derived" records)
    "fuse_moe+lowrank_kv+h2o+steer": ({"Attention", "MatMul", "TopK", "ScatterND"}, {"graphwright::evict_h2o"}, True),
}

CASES = {
    # id: (model, recipe, emphasis, ONNX op types that must appear, runtime ops, cache evicted)
    "lowrank_kv_reconstruct_qwen2": ("tiny-qwen2", "lowrank_kv(keep=0.6, value_path='reconstruct')", None, {"Attention"}, set(), False),
    "fuse_moe_phimoe": ("tiny-phimoe", "fuse_moe", None, {"ArgMax", "ScatterND"}, set(), False),
    "block_sparse_moba_prefill": ("tiny-qwen2", "block_sparse(block=4, top_k=2, mode='moba', dense_layers=[0], prefill=True)",
                                  None, {"Attention", "TopK"}, set(), False),
}


def _model_recipe(case):
    return CASES[case][:2] if case in CASES else backend_cases()[case]


@pytest.fixture(scope="module")
def exported(onnx_artifact):
    """exported(case) -> (CompiledModel, export folder) for a CASES id or a registry case id."""
    return lambda case: onnx_artifact(*_model_recipe(case))


def _check_artifact(cm, out, recipe, op_types, runtime_ops, evicted):
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["recipe"] == str(cm.recipe) and meta["verification"]["passed"]
    assert meta["verification"]["max_abs_logit_diff"] <= 1e-4
    assert {r["op"] for r in meta["runtime_ops"]} == runtime_ops
    nodes = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert op_types <= nodes, op_types - nodes
    assert not any(n.startswith("graphwright") for n in nodes)
    if "lowrank_kv" in recipe and runtime_ops:
        assert all(r["derived"] and all(d["ops"] for d in r["derived"]) for r in meta["runtime_ops"])
    # 30 + 24 tokens: past every eviction budget of the cases here
    ids, mask = left_padded_batch(256, [30, 21], seed=4)
    cm.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    if evicted:
        assert cm.last_stats["kv_bytes"] < 0.8 * cm.last_stats["kv_bytes_dense"]
    return ids, mask


@pytest.mark.parametrize("case", list(REGISTRY_CHECKS))
def test_registry_artifact_ops(case, exported):
    cm, out = exported(case)
    _check_artifact(cm, out, backend_cases()[case][1], *REGISTRY_CHECKS[case])


@pytest.mark.parametrize("case", list(CASES))
def test_pass_exports_and_matches_torch_runtime(case, exported):
    name, recipe, emphasis, op_types, runtime_ops, evicted = CASES[case]
    cm, out = exported(case)
    ids, mask = _check_artifact(cm, out, recipe, op_types, runtime_ops, evicted)
    rt = gw.load(out)
    kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    if emphasis is not None:
        kw["emphasis"] = emphasis
    want = cm.generate(ids, **kw)
    want_stats = dict(cm.last_stats)
    got = rt.generate(ids, **kw)
    assert got.shape == (2, 30 + 24)
    assert torch.equal(got, want)
    assert rt.last_stats["kv_bytes"] == want_stats["kv_bytes"]


def test_latent_cache_is_the_onnx_state(exported):
    """lowrank_kv's artifact keeps latents as its cache inputs/outputs (the memory saving survives export)."""
    cm, out = exported("lowrank_kv")
    meta = json.loads((out / "graphwright.json").read_text())
    widths = {s["name"]: s["shape"][-1] for s in meta["state"] if s["kind"] == "kv"}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dims = {i.name: i.type.tensor_type.shape.dim[-1].dim_value for i in model.graph.input}
    assert widths and all(dims[n] == w for n, w in widths.items())
    dense = cm.info.num_kv_heads * cm.info.head_dim
    assert all(w < dense for w in widths.values())
    assert sum(r["kv_bytes_per_token"] for r in meta["layers"]) < 0.7 * cm.info.dense_kv_bytes_per_token()


def test_steer_without_emphasis_is_the_base_model(exported):
    """The steering input defaults to zeros in ONNX Runtime: no emphasis gives the unsteered logits exactly."""
    base = _compiled("tiny-llama")
    cm, out = exported("steer")
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["inputs"][-1] == "steer_weights" and meta["extra_inputs"][0]["kind"] == "steer"
    rt = gw.load(out)
    ids, mask = left_padded_batch(256, [12, 9], seed=1)
    real = mask.bool()
    assert (rt.logits(ids, mask)[real] - base.logits(ids, mask)[real]).abs().max() <= 1e-4
    steered = rt.logits(ids, mask, emphasis=[[(0, 3)], [(1, 4)]])
    assert (steered[real] - cm.logits(ids, mask, emphasis=[[(0, 3)], [(1, 4)]])[real]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="outside the prompt"):
        rt.generate(ids, attention_mask=mask, emphasis=[[(0, 30)], []])


@pytest.mark.slow
def test_smollm2_demo_recipe_onnx_greedy_matches_torch(tmp_path):
    model, tok = gw.load_model("smollm2-135m")
    cm = gw.compile(model, recipe=DEMO_RECIPE, tokenizer=tok)
    out = gw.export_onnx(cm, tmp_path / "demo")
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["recipe"] == DEMO_RECIPE and meta["verification"]["passed"]
    assert (out / "model.onnx.data").is_file()
    rt = gw.load(out)
    enc = tok(["The capital of France is", "Once upon a time, in a small village, there lived"],
              return_tensors="pt", padding=True, padding_side="left")
    want = cm.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=16, eos_token_id=[])
    torch_stats = dict(cm.last_stats)
    got = rt.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(got, want)
    assert_onnx_cache_like_torch(torch_stats, rt.last_stats, meta, cm.info, batch=2)
    assert torch_stats["kv_bytes"] < 0.65 * rt.last_stats["kv_bytes_dense"]


@pytest.mark.parametrize("case", ["block_sparse", "block_sparse_moba_prefill", "window"])
def test_sparse_variants_are_not_the_dense_model(case, exported):
    """The sparse cases compare non-trivial outputs: their tokens differ from the dense model's."""
    name = _model_recipe(case)[0]
    cm, _ = exported(case)
    ids, mask = left_padded_batch(256, [30, 21], seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    assert not torch.equal(cm.generate(ids, **kw), _compiled(name).generate(ids, **kw))


def test_gemfilter_exports_its_selection_graph(exported):
    """GemFilter's truncated selection graph (the registry's lossy example, keep=8) is exported beside
    the model; ORT keeps the same prompt tokens and generates the same tokens as the torch runtime
    (and not those of the unfiltered model)."""
    cm, out = exported("gemfilter")
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["gemfilter"]["keep"] == 8 and (out / meta["gemfilter"]["model_file"]).is_file()
    assert meta["verification"]["gemfilter_selection"]["passed"]
    select = onnx.load(str(out / meta["gemfilter"]["model_file"]), load_external_data=False)
    assert [o.name for o in select.graph.output] == ["scores"]
    assert sum(n.op_type == "Attention" for n in select.graph.node) == 1  # layer 0 only: truncated after layer 1's q/k
    rt = gw.load(out)
    ids, mask = left_padded_batch(256, [30, 21], seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    want = cm.generate(ids, **kw)
    kept = cm.last_stats["gemfilter"]["kept_tokens"]
    got = rt.generate(ids, **kw)
    assert torch.equal(got, want) and rt.last_stats["gemfilter"]["kept_tokens"] == kept == [8, 8]
    shared = gw.load(out, share_weights=True)  # the selection graph reads the step's mapped weights (session_weights.py)
    assert shared.weights.mapped_bytes > 0 and torch.equal(shared.generate(ids, **kw), want)
    assert not torch.equal(got, _compiled("tiny-llama").generate(ids, **kw))


@pytest.mark.parametrize("case", ["block_sparse", "block_sparse_moba_prefill"])
def test_page_summary_state_matches_torch(case, exported):
    """The artifact's page-summary state (recomputed per step in ONNX) equals the torch runtime's
    (updated one page per decode step) after a left-padded prefill and three decode steps, within
    the fp32 rounding of the keys themselves (ORT's projections + RoPE differ from torch's by ~1e-6)."""
    from graphwright.runtime.generate import positions_from_mask

    cm, out = exported(case)
    rt = gw.load(out)
    ids, mask = left_padded_batch(256, [30, 21], seed=4)
    specs = cm.step_graph.state
    summary = [i for i, s in enumerate(specs) if s.kind == "summary"]
    assert summary
    states = {"torch": cm.step_graph.init_state(2), "onnx": [s.empty(2) for s in rt.state_specs]}
    steps = {"torch": cm._step, "onnx": rt.step}
    pos = positions_from_mask(mask)
    feed = ids
    for _ in range(4):
        for name in states:
            _, states[name] = steps[name](feed, pos, torch.tensor([feed.shape[1] - 1]), states[name])
        for i in summary:
            assert states["onnx"][i].shape == states["torch"][i].shape
            assert torch.allclose(states["onnx"][i], states["torch"][i], atol=1e-5, rtol=1e-5), specs[i].name
        feed, pos = torch.tensor([[7], [9]]), pos[:, -1:] + 1
