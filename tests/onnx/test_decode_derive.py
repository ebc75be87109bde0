"""``decode.onnx`` of an append-only decode graph (SnapKV) derived from ``model.onnx`` (``codegen/onnx/decode_derive.py``).

The derived graph is checked against a decode graph exported the long way (same logits and state
over decode steps, 1e-5), shares ``model.onnx.data``, and the export skips the second trace."""

from __future__ import annotations

import json

import pytest
import torch

import graphwright as gw
from graphwright.capture.step_graph import positions_from_mask
from graphwright.codegen.onnx import decode_derive
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.codegen.onnx.decode_slots import decode_graph, snapkv_decode
from tests.conftest import left_padded_batch

RECIPE = "snapkv(budget=6, window=2)"


def test_snapkv_decode_passes_its_arguments_through():
    args = [torch.randn(2, 3) for _ in range(5)]
    out = snapkv_decode(*args, 0.5, 6, 2, 5, "max")
    assert len(out) == len(decode_derive.PASS_THROUGH)
    assert all(o is args[i] for o, i in zip(out, decode_derive.PASS_THROUGH))


def test_renames_refuses_what_is_not_a_plain_snapkv_pass_through():
    snap = "graphwright::evict_snapkv"
    args = [{"output": "cut0"}, {"output": "cut1"}, {"output": "cut2"}, {"input": "positions"}, {"output": "cut3"}]
    rec = {"op": snap, "args": args, "results": ["k0", "v0", "p0"]}
    assert decode_derive.renames([rec]) == {"cut1": "k0_next", "cut2": "v0_next", "cut3": "p0_next"}
    assert decode_derive.renames([{**rec, "op": "graphwright::evict_h2o"}]) is None
    assert decode_derive.renames([{**rec, "args": [*args[:4], {"input": "p0"}]}]) is None  # a graph input: not a cut output
    assert decode_derive.renames([{**rec, "derived": [{"from": 0}]}]) is None
    assert decode_derive.renames([rec, {**rec, "results": ["k1", "v1", "p1"]}]) is None  # one cut tensor, two states


def test_h2o_decode_graph_is_not_append_only():
    cm = gw.compile(gw.load_model("tiny-llama")[0], recipe="h2o(heavy=4, recent=4)", verify=False)
    assert not decode_derive.appends_only(*decode_graph(cm.step_graph.gm, cm.step_graph.state))
    cm = gw.compile(gw.load_model("tiny-llama")[0], recipe=RECIPE, verify=False)
    assert decode_derive.appends_only(*decode_graph(cm.step_graph.gm, cm.step_graph.state))




@pytest.fixture(scope="module")
def pair(tmp_path_factory, onnx_artifact):
    """(cm, derived export folder, long-way export folder)."""
    cm, derived = onnx_artifact("tiny-llama", RECIPE)
    long = tmp_path_factory.mktemp("long") / "o"
    mp = pytest.MonkeyPatch()
    mp.setattr(decode_derive, "appends_only", lambda *a: False)
    try:
        gw.export_onnx(cm, long)
    finally:
        mp.undo()
    return cm, derived, long


def test_snapkv_export_derives_its_decode_graph(pair):
    _, derived, long = pair
    meta = json.loads((derived / "graphwright.json").read_text())
    phases = meta["export"]["phases"]
    assert meta["decode"]["derived_from"] == "model.onnx" and meta["decode"]["runtime_ops"] == []
    assert "decode_derive" in phases and not any(p.startswith("decode_torch_export") for p in phases)
    assert meta["verification"]["passed"]
    assert 0.8 * meta["export"]["total_s"] - 0.05 <= sum(phases.values()) <= meta["export"]["total_s"] + 0.01 * len(phases)
    assert sorted(p.name for p in derived.iterdir() if p.suffix == ".data") == ["model.onnx.data"]
    import onnx

    m = onnx.load(str(derived / "decode.onnx"), load_external_data=False)
    prefill = onnx.load(str(derived / "model.onnx"), load_external_data=False).graph
    assert len(m.graph.node) < len(prefill.node)
    # the prompt step's in-graph SnapKV (scores, TopK ranks, gathers) is not in the decode graph, and
    # model.onnx lost the extra "<state>_append" outputs decode.onnx was derived from
    assert any(n.op_type == "TopK" for n in prefill.node) and not any(n.op_type == "TopK" for n in m.graph.node)
    assert [o.name for o in prefill.output] == meta["outputs"] and not any(o.name.endswith("_append") for o in prefill.output)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and {e.value for t in ext for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert [o.name for o in m.graph.output] == meta["decode"]["outputs"]
    long_meta = json.loads((long / "graphwright.json").read_text())
    assert long_meta["decode"]["derived_from"] is None and "decode_torch_export" in long_meta["export"]["phases"]
    assert long_meta["decode"]["outputs"] == meta["decode"]["outputs"]


@torch.inference_mode()
def test_derived_decode_equals_the_exported_one(pair):
    cm, derived, long = pair
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=3)
    steps = {}
    for name, folder in (("derived", derived), ("long", long)):
        meta = json.loads((folder / "graphwright.json").read_text())
        steps[name] = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
    pos = positions_from_mask(mask)
    T = ids.shape[1]
    state = {n: cm.step_graph.init_state(2) for n in steps}
    step_in = (ids, pos, torch.arange(T))
    for _ in range(6):  # the prefill (model.onnx on both sides), then 5 decode steps on each decode.onnx
        out = {n: s(*step_in, state[n]) for n, s in steps.items()}
        (ld, sd), (ll, sl) = out["derived"], out["long"]
        assert ld.shape == ll.shape and float((ld - ll).abs().max()) <= 1e-5
        assert [t.shape for t in sd] == [t.shape for t in sl]
        assert all(float((a.float() - b.float()).abs().max()) <= 1e-5 for a, b in zip(sd, sl))
        state = {"derived": sd, "long": sl}
        nxt = ll[:, -1].argmax(-1, keepdim=True)
        step_in = (nxt, step_in[1][:, -1:] + 1, torch.zeros(1, dtype=torch.long))
    assert steps["derived"].decode is not None  # the decode steps above ran decode.onnx
    runner = gw.load(derived)  # the schema accepts the record; generate runs prefill + derived decode
    assert torch.equal(runner.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0),
                       cm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0))
