"""``decode.onnx`` exported by a child process (``codegen/onnx/decode_process.py``).

The decode graph sent as data and rebuilt computes what the original does (same parameter order, tied tensors
still tied); an export through the child writes the same ``decode.onnx`` and ``model.onnx`` bytes as the serial
route and verifies; which decode graphs go to the child; a child that fails leaves the export to this process."""

from __future__ import annotations

import io
import json

import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx import decode_process
from graphwright.codegen.onnx.export import _decode_plan, _exported_long_way, _split_graph, example_inputs
from graphwright.codegen.onnx.phases import Phases
from graphwright.codegen.onnx.sliding_window import export_view
from tests.conftest import _tiny

H2O = "h2o(heavy=4, recent=4)"  # decode_rows (default): the decode graph is exported the long way


def _sg(recipe, name="tiny-llama"):
    return export_view(gw.compile(_tiny(name), recipe=recipe, verify=False)).step_graph


def _round_trip(payload):
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("recipe", [H2O, "streaming(sinks=2, window=6)"])
def test_rebuilt_decode_graph_computes_the_same(recipe):
    sg = _sg(recipe)
    gm = _split_graph(sg, _decode_plan(sg)[0], Phases(), "decode_")[0]
    new = decode_process.rebuild(_round_trip(decode_process.graph_payload(gm)))
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in gm.named_parameters()]
    assert [n for n, _ in new.named_buffers()] == [n for n, _ in gm.named_buffers()]
    assert [(n.op, n.name) for n in new.graph.nodes] == [(n.op, n.name) for n in gm.graph.nodes]
    assert new.meta == gm.meta
    torch.manual_seed(0)
    args = list(example_inputs(sg.state, seq=1, cache=6))
    args[0] = torch.randint(0, sg.info.vocab_size, args[0].shape)
    args = [a if i < 3 or a.dtype != torch.float32 else torch.randn_like(a) for i, a in enumerate(args)]
    want, got = gm(*args), new(*args)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_tied_tensors_stay_tied():
    """Two attributes that share a storage (tied embeddings) share it after the round trip: one ONNX initializer."""
    root = torch.nn.Module()
    root.a, root.b = torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False)
    root.b.weight = root.a.weight
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    linear = torch.nn.functional.linear
    graph.output(graph.call_function(linear, (graph.call_function(linear, (x, graph.get_attr("a.weight"))),
                                              graph.get_attr("b.weight"))))
    gm = torch.fx.GraphModule(root, graph)
    new = decode_process.rebuild(_round_trip(decode_process.graph_payload(gm)))
    assert new.a.weight.data_ptr() == new.b.weight.data_ptr()
    x = torch.randn(2, 3)
    assert torch.equal(new(x), gm(x))


def test_a_target_without_an_importable_name_is_refused():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(lambda t: t + 1, (x,)))
    with pytest.raises(ValueError, match="cannot be named"):
        decode_process.graph_payload(torch.fx.GraphModule(torch.nn.Module(), graph))


def test_which_decode_graphs_go_to_the_child(monkeypatch):
    from graphwright.codegen.onnx import decode_slots

    assert _exported_long_way(_decode_plan(_sg(H2O)))
    assert _exported_long_way(_decode_plan(_sg("streaming(sinks=2, window=6)")))
    assert not _exported_long_way(_decode_plan(_sg("snapkv(budget=6)")))  # derived from model.onnx (decode_derive)
    assert not _exported_long_way(_decode_plan(_sg("")))  # no eviction: no decode graph
    monkeypatch.setattr(decode_slots, "ROWS", False)
    assert not _exported_long_way(_decode_plan(_sg(H2O)))  # swapped from model.onnx (decode_swap)
    sg = _sg(H2O)
    monkeypatch.setattr(decode_process, "ENABLED", "auto")
    assert not decode_process.wanted(sg)  # 2 layers: the serial route
    monkeypatch.setattr(decode_process, "MIN_LAYERS", 2)
    assert decode_process.wanted(sg) == (__import__("os").cpu_count() >= 2)


def _export(cm, folder):
    gw.export_onnx(cm, folder, overwrite=True)
    return json.loads((folder / "graphwright.json").read_text())


def test_child_export_equals_the_serial_one(tmp_path, monkeypatch):
    cm = gw.compile(_tiny("tiny-llama"), recipe=H2O, verify=False)
    monkeypatch.setattr(decode_process, "ENABLED", False)
    serial = _export(cm, tmp_path / "serial")
    monkeypatch.setattr(decode_process, "ENABLED", True)
    child = _export(cm, tmp_path / "child")
    assert "decode_process" not in serial["export"]["notes"]
    assert child["export"]["notes"]["decode_process"].startswith("decode.onnx exported by a child process")
    assert "decode_torch_export" in child["export"]["phases"] and child["export"]["other_process_cpu_s"] > 0
    for name in ("model.onnx", "decode.onnx"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "child" / name).read_bytes(), name
    assert not (tmp_path / "child" / "decode.onnx.data").exists() and child["decode"]["shares_weights"]
    assert child["verification"]["passed"] and child["decode"] == serial["decode"]


def test_a_failed_child_leaves_the_export_to_this_process(tmp_path, monkeypatch):
    """The child cannot find its payload (the parent wrote it under another name): the decode graph is exported here."""
    cm = gw.compile(_tiny("tiny-llama"), recipe=H2O, verify=False)
    monkeypatch.setattr(decode_process, "ENABLED", True)
    monkeypatch.setattr(decode_process, "PAYLOAD", "elsewhere.pt")
    meta = _export(cm, tmp_path / "out")
    note = meta["export"]["notes"]["decode_process"]
    assert note.startswith("failed (RuntimeError: FileNotFoundError") and note.endswith("exported here"), note
    assert meta["verification"]["passed"] and (tmp_path / "out" / "decode.onnx").exists()


def test_verification_with_a_precomputed_reference(tmp_path):
    """``export_onnx`` computes the torch side of the verification while the child works (``torch_reference``):
    the result equals the interleaved run's; the reference is what the artifact is compared with; a reference for
    other probe arguments is refused."""
    from graphwright.codegen.onnx.artifact import OnnxStep
    from graphwright.codegen.onnx.export import torch_reference, verify_artifact

    cm = gw.compile(_tiny("tiny-llama"), recipe=H2O, verify=False)
    out = gw.export_onnx(cm, tmp_path / "out", verify=False)
    meta = json.loads((out / "graphwright.json").read_text())
    step = OnnxStep.from_metadata(out / "model.onnx", meta, providers=["CPUExecutionProvider"])
    ref = torch_reference(cm, 2, 64)
    assert verify_artifact(cm, step, 2, 64, reference=ref) == verify_artifact(cm, step, 2, 64)
    with pytest.raises(ValueError, match="reference computed for 2 decode steps"):
        verify_artifact(cm, step, 3, 64, reference=ref)
    step_in, logits = ref["steps"][1]
    ref["steps"][1] = (step_in, logits + 0.5)  # the first decode step's torch logits
    with pytest.raises(gw.GraphwrightError, match="failed at decode step 1"):
        verify_artifact(cm, step, 2, 64, reference=ref)


def test_files_a_failed_child_wrote_are_removed(tmp_path, monkeypatch):
    """A child that wrote decode.onnx and an unshared decode.onnx.data before failing: the serial route's decode.onnx
    shares model.onnx.data and no stale data file is left (or recorded in graphwright.json)."""
    cm = gw.compile(_tiny("tiny-llama"), recipe=H2O, verify=False)
    monkeypatch.setattr(decode_process, "ENABLED", True)
    real = decode_process.DecodeJob.result

    def result(self):
        real(self)  # the child's decode.onnx (weights shared), then a leftover as if it had saved unshared and failed
        (tmp_path / "out" / "decode.onnx.data").write_bytes(b"stale")
        raise RuntimeError("failed after saving")

    monkeypatch.setattr(decode_process.DecodeJob, "result", result)
    meta = _export(cm, tmp_path / "out")
    assert meta["export"]["notes"]["decode_process"].startswith("failed (RuntimeError: failed after saving)")
    assert not (tmp_path / "out" / "decode.onnx.data").exists() and meta["decode"]["shares_weights"]
    assert "decode.onnx.data" not in meta["files"] and meta["verification"]["passed"]
