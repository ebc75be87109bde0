"""Every registered pass exports: the artifact passes onnx.checker (full), verifies against the torch
module, and its ONNX Runtime greedy tokens (batch 2, left-padded) equal the torch runtime's.

Eviction policies run as a graph/runtime split (``codegen/onnx/split.py``): the test also checks
that the cache really shrank, so equality is not the trivial dense case.
"""

import functools
import json

import onnx
import pytest
import torch

import graphwright as gw
from graphwright.cli.cmd_demo import DEMO_RECIPE
from tests.conftest import _compiled, _tiny, left_padded_batch

CASES = {
    # id: (model, recipe, emphasis, ONNX op types that must appear, runtime ops, cache evicted)
    "lowrank_kv": ("tiny-llama", "lowrank_kv(keep=0.6)", None, {"Attention", "MatMul"}, set(), False),
    "lowrank_kv_reconstruct_qwen2": ("tiny-qwen2", "lowrank_kv(keep=0.6, value_path='reconstruct')", None, {"Attention"}, set(), False),
    "steer": ("tiny-llama", "steer(heads='all', alpha=0.01)", [[(2, 10)], [(0, 5)]], {"Attention", "GatherElements"}, set(), False),
    "fuse_moe_mixtral": ("tiny-mixtral", "fuse_moe", None, {"TopK", "ScatterND"}, set(), False),
    "fuse_moe_phimoe": ("tiny-phimoe", "fuse_moe", None, {"ArgMax", "ScatterND"}, set(), False),
    "h2o": ("tiny-llama", "h2o(heavy=4, recent=4)", None, {"Attention"}, {"graphwright::evict_h2o"}, True),
    "snapkv": ("tiny-qwen2", "snapkv(budget=12, window=4)", None, {"Attention"}, {"graphwright::evict_snapkv"}, True),
    "streaming": ("tiny-llama", "streaming(sinks=2, window=8)", None, {"Attention", "CumSum"}, {"graphwright::evict_streaming"}, True),
    "fastgen": ("tiny-llama", "fastgen(force='local', local=4)", None, {"Attention"}, {"graphwright::evict_fastgen"}, True),
    # block selection in the graph (TopK over block scores -> additive mask); every layer sparse, 4-token blocks
    "block_sparse_quest": ("tiny-llama", "block_sparse(block=4, top_k=2, mode='quest', dense_layers=[])", None,
                           {"Attention", "TopK", "ReduceMin"}, set(), False),
    "block_sparse_moba_prefill": ("tiny-qwen2", "block_sparse(block=4, top_k=2, mode='moba', dense_layers=[0], prefill=True)",
                                  None, {"Attention", "TopK"}, set(), False),
    "window": ("tiny-llama", "window(size=6, sinks=2)", None, {"Attention"}, set(), False),
    # eviction over latent caches: keys rebuilt in the graph (latent_keys), the shared payload
    # selected and sliced into c_k / c_v after the runtime op ("derived" records)
    "lowrank_kv+h2o": ("tiny-llama", "lowrank_kv(keep=0.8) + h2o(heavy=4, recent=4)", None, {"Attention", "MatMul"},
                       {"graphwright::evict_h2o"}, True),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(case) -> (CompiledModel, export folder); each case is compiled and exported once."""
    root = tmp_path_factory.mktemp("onnx-passes")

    @functools.lru_cache(maxsize=None)
    def get(case):
        name, recipe = CASES[case][:2]
        cm = gw.compile(_tiny(name), recipe=recipe)
        return cm, gw.export_onnx(cm, root / case)

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_pass_exports_and_matches_torch_runtime(case, exported):
    name, recipe, emphasis, op_types, runtime_ops, evicted = CASES[case]
    cm, out = exported(case)
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

    rt = gw.load(out)
    # 30 + 24 tokens: past every budget above (h2o 8, snapkv 12, streaming 10, fastgen local 4)
    ids, mask = left_padded_batch(256, [30, 21], seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    if emphasis is not None:
        kw["emphasis"] = emphasis
    want = cm.generate(ids, **kw)
    want_stats = dict(cm.last_stats)
    got = rt.generate(ids, **kw)
    assert got.shape == (2, 30 + 24)
    assert torch.equal(got, want)
    assert rt.last_stats["kv_bytes"] == want_stats["kv_bytes"]
    if evicted:
        assert want_stats["kv_bytes"] < 0.8 * want_stats["kv_bytes_dense"]
    if emphasis is not None:  # the steering input really reached the ONNX graph
        kw.pop("emphasis")
        assert not torch.equal(rt.generate(ids, **kw), got)
        assert torch.equal(rt.generate(ids, **kw), cm.generate(ids, **kw))


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
    kv = cm.last_stats["kv_bytes"]
    got = rt.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(got, want)
    assert rt.last_stats["kv_bytes"] == kv and kv < 0.65 * rt.last_stats["kv_bytes_dense"]


@pytest.mark.parametrize("case", ["block_sparse_quest", "block_sparse_moba_prefill", "window"])
def test_sparse_variants_are_not_the_dense_model(case, exported):
    """The sparse cases above compare non-trivial outputs: their tokens differ from the dense model's."""
    name = CASES[case][0]
    cm, _ = exported(case)
    ids, mask = left_padded_batch(256, [30, 21], seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    assert not torch.equal(cm.generate(ids, **kw), _compiled(name).generate(ids, **kw))


def test_gemfilter_exports_its_selection_graph(tmp_path):
    """GemFilter's truncated selection graph is exported beside the model; ORT keeps the same prompt
    tokens and generates the same tokens as the torch runtime (and not those of the unfiltered model)."""
    model = _tiny("tiny-llama")
    cm = gw.compile(model, recipe="gemfilter(layer=1, keep=12)")
    out = gw.export_onnx(cm, tmp_path / "gem")
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["gemfilter"]["keep"] == 12 and (out / meta["gemfilter"]["model_file"]).is_file()
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
    assert torch.equal(got, want) and rt.last_stats["gemfilter"]["kept_tokens"] == kept == [12, 12]
    assert not torch.equal(got, _compiled("tiny-llama").generate(ids, **kw))


@pytest.mark.parametrize("case", ["block_sparse_quest", "block_sparse_moba_prefill"])
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
