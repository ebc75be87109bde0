"""Sibling MatMul fusion (``codegen/onnx/fuse_matmul.py``): MatMuls sharing an activation become one MatMul + Split.

The exact setting is the fusion itself (weights concatenated, never changed): on a hand-built graph ONNX
Runtime gives the same outputs before and after; on an exported tiny Llama the fused artifact gives the
same greedy tokens as the torch runtime and as an export without the fusion (logits within 1e-5).
The fusion is off by default (``optimize.FUSE_SIBLINGS``); these tests turn it on.
"""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphwright as gw
from graphwright.codegen.onnx import optimize
from graphwright.codegen.onnx.fuse_matmul import fuse_sibling_matmuls, sibling_groups
from tests.conftest import _compiled, left_padded_batch


def _graph(opset: int = 23) -> onnx.ModelProto:
    """x @ wq, x @ wk, x @ wv (siblings; wq also feeds an Add), h @ wo (alone), x @ w_odd (other K: not a sibling of x's)."""
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in
         {"wq": (8, 6), "wk": (8, 4), "wv": (8, 4), "wo": (14, 8), "wt": (6,)}.items()}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]), helper.make_node("Concat", ["q", "k", "v"], ["h"], axis=-1),
             helper.make_node("Relu", ["h"], ["hr"]), helper.make_node("MatMul", ["hr", "wo"], ["o"]),
             helper.make_node("Add", ["q", "wt"], ["tied"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 8])],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["B", 3, 8]),
                               helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", 3, 4]),
                               helper.make_tensor_value_info("tied", TensorProto.FLOAT, ["B", 3, 6])],
                              [numpy_helper.from_array(a, n) for n, a in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def test_siblings_fused_outputs_unchanged():
    proto = _graph()
    model = ir.serde.deserialize_model(proto)
    assert [len(nodes) for _, nodes in sibling_groups(model.graph)] == [3]
    assert fuse_sibling_matmuls(model) == 2
    fused = ir.serde.serialize_model(model)
    onnx.checker.check_model(fused, full_check=True)
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops["MatMul"] == 2 and ops["Split"] == 1  # the fused q/k/v and the lone output projection
    assert [o.name for o in fused.graph.output] == ["o", "k", "tied"]  # a graph output keeps its name
    inits = {i.name: i for i in fused.graph.initializer}
    assert "wq" not in inits and "wk" not in inits and "wo" in inits
    (w,) = [i for i in fused.graph.initializer if i.name.endswith("_weight")]
    assert list(w.dims) == [8, 14]
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    for want, got in zip(_run(proto, x), _run(fused, x)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_old_opset_left_alone():
    model = ir.serde.deserialize_model(_graph(opset=11))
    assert fuse_sibling_matmuls(model) == 0
    assert sum(n.op_type == "MatMul" for n in model.graph) == 4


@pytest.fixture(scope="module")
def tiny_llama_both(tmp_path_factory):
    """tiny-llama exported with and without the fusion: (compiled, fused folder, unfused folder)."""
    root = tmp_path_factory.mktemp("fuse")
    cm = _compiled("tiny-llama")
    default = optimize.FUSE_SIBLINGS
    try:
        optimize.FUSE_SIBLINGS = True
        gw.export_onnx(cm, root / "fused")
        optimize.FUSE_SIBLINGS = False
        gw.export_onnx(cm, root / "plain")
    finally:
        optimize.FUSE_SIBLINGS = default
    return cm, root / "fused", root / "plain"


def test_exported_model_fused_and_exact(tiny_llama_both):
    cm, fused, plain = tiny_llama_both
    layers = cm.info.num_layers
    count = {}
    for name, folder in (("fused", fused), ("plain", plain)):
        m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        count[name] = collections.Counter(n.op_type for n in m.graph.node)
    # per layer q/k/v -> 1 and gate/up -> 1: three MatMuls fewer, two Splits more
    assert count["plain"]["MatMul"] - count["fused"]["MatMul"] == 3 * layers
    assert count["fused"]["Split"] - count["plain"]["Split"] == 2 * layers
    ids, mask = left_padded_batch(256, [17, 11], seed=3)
    a, b = gw.load(fused), gw.load(plain)
    real = mask.bool()
    assert (a.logits(ids, mask)[real] - b.logits(ids, mask)[real]).abs().max().item() <= 1e-5
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    want = cm.generate(ids, **kw)
    assert torch.equal(a.generate(ids, **kw), want)
    assert torch.equal(b.generate(ids, **kw), want)
