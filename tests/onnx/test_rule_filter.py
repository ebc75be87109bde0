"""onnxscript's rewrite rules guarded by their root op type (``codegen/onnx/rule_filter.py``): the same bytes,
rules still fire, other op types skipped without running the matcher."""

from __future__ import annotations

import hashlib
import json

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnxscript import rewriter

import graphwright as gw
from graphwright.codegen.onnx import rule_filter
from graphwright.codegen.onnx.optimize import default_rules
from graphwright.models.tiny import tiny_model


def _digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.onnx*"))}


@pytest.mark.parametrize("model, recipe", [("tiny-llama", ""), ("tiny-qwen2", "h2o(heavy=4, recent=4)")])
def test_same_bytes_with_and_without_filter(tmp_path, monkeypatch, model, recipe):
    """tiny Llama identity and tiny Qwen2 H2O (in-graph prompt eviction + decode.onnx): every ONNX file written is
    byte-identical whether the rules are filtered or not; the filtered export verifies against the torch module."""
    cm = gw.compile(tiny_model(model), recipe=recipe, verify=False)
    out = {}
    for on in (False, True):
        monkeypatch.setattr(rule_filter, "ENABLED", on)
        folder = gw.export_onnx(cm, tmp_path / str(on), verify=on)
        out[on] = _digests(folder)
        notes = json.loads((folder / "graphwright.json").read_text())["export"]["notes"]
        assert notes["rule_filter"] == ("on" if on else "off")  # the route is recorded in the artifact
    assert "model.onnx" in out[True] and (recipe == "" or "decode.onnx" in out[True])
    assert out[False] == out[True]


def _double_transpose():
    """y = Relu(Transpose(Transpose(x))): TransposeTranspose makes the two transposes one Identity."""
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
             helper.make_node("Relu", ["t2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_rules_fire_through_the_filter_and_skip_other_op_types(monkeypatch):
    rules = default_rules()  # filtered (ENABLED)
    guarded = [r for r in rules if rule_filter.root_op_type(r) is not None]
    assert len(guarded) >= len(rules) - 2 and all(r.try_rewrite.__name__ == "try_rewrite" for r in guarded)
    model = _double_transpose()
    rewriter.RewritePass(rules)(model)
    assert [n.op_type for n in model.graph] == ["Identity", "Relu"]  # TransposeTranspose fired through its guard
    monkeypatch.setattr(rule_filter, "ENABLED", False)
    plain = _double_transpose()
    rewriter.RewritePass(default_rules())(plain)
    assert ir.serde.serialize_model(plain) == ir.serde.serialize_model(model)  # what the unguarded rules make

    # a guarded rule never reaches its matcher for a node of another op type
    tt = next(r for r in guarded if r.name == "TransposeTranspose")
    calls = []
    monkeypatch.setattr(type(tt._matcher), "match", lambda self, *a, **k: calls.append(a[2].op_type))
    model = _double_transpose()
    for node in model.graph:
        tt.try_rewrite(model, model.graph, node)
    assert calls == ["Transpose", "Transpose"]


def test_off_switch_and_unfilterable_rules_kept(monkeypatch):
    monkeypatch.setattr(rule_filter, "ENABLED", False)
    plain = default_rules()
    assert all("try_rewrite" not in vars(r) for r in plain)  # onnxscript's own objects
    monkeypatch.setattr(rule_filter, "ENABLED", True)
    kept = [r for r in plain if rule_filter.root_op_type(r) is None]
    out = rule_filter.filtered(plain)
    assert [r for r in out if r in kept] == kept and len(out) == len(plain)
    assert not any("try_rewrite" in vars(r) for r in plain)  # the originals are not modified
    assert rule_filter.root_op_type(object()) is None
    model = _double_transpose()
    onnx.checker.check_model(ir.serde.serialize_model(model))


class _Program:  # what ``optimize`` reads of a ``torch.onnx.ONNXProgram``
    def __init__(self, model):
        self.model = model


@pytest.mark.slow
def test_smollm2_step_graph_optimized_to_the_same_bytes(tmp_path, monkeypatch):
    """SmolLM2-135M identity (30 layers, ~4,300 nodes before optimizing): the model ``optimize`` receives during a
    real export, optimized with and without the filter, serializes to the same bytes; the filtered route is the
    one the export took (its artifact loads in ONNX Runtime)."""
    from graphwright.codegen.onnx import decode_process
    from graphwright.codegen.onnx import export as export_mod
    from graphwright.codegen.onnx.optimize import optimize

    kept, original = [], export_mod.optimize

    def keep(program):
        kept.append(ir.serde.serialize_model(program.model))
        return original(program)

    monkeypatch.setattr(export_mod, "optimize", keep)
    monkeypatch.setattr(decode_process, "ENABLED", False)
    cm = gw.compile("smollm2-135m", verify=False)
    gw.export_onnx(cm, tmp_path / "a", verify=False)
    assert len(kept) == 1 and len(kept[0].graph.node) > 3000
    out = {}
    for on in (False, True):
        monkeypatch.setattr(rule_filter, "ENABLED", on)
        program = _Program(ir.serde.deserialize_model(kept[0]))
        optimize(program)
        out[on] = ir.serde.serialize_model(program.model).SerializeToString()
    assert out[False] == out[True]
    exported = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in exported.graph.node] == [n.op_type for n in onnx.load_from_string(out[True]).graph.node]
