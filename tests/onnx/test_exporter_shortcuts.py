"""Shortcuts through torch.onnx.export (``codegen/onnx/exporter_shortcuts.py``): same ONNX graph as the
exporter's full path, and the full path when a program needs a decomposition."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import graphwright as gw
import graphwright.codegen.onnx.exporter_shortcuts as sd


def _op_types(path) -> list:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_skip_gives_the_exporters_graph(tmp_path, monkeypatch, onnx_artifact):
    """tiny-llama: the skip is taken (recorded in graphwright.json) and the ONNX graph has the same
    node sequence as an export through the exporter's own decomposition; both verify."""
    cm, fast = onnx_artifact("tiny-llama", "identity")
    meta = json.loads((fast / "graphwright.json").read_text())
    assert meta["export"]["notes"]["decompositions"] == "skipped"
    assert meta["verification"]["passed"]
    monkeypatch.setattr(sd, "_internals", lambda: (None, None, None))  # exporter internals "missing": the full path
    full = gw.export_onnx(cm, tmp_path / "full")
    assert json.loads((full / "graphwright.json").read_text())["export"]["notes"]["decompositions"] != "skipped"
    assert _op_types(fast / "model.onnx") == _op_types(full / "model.onnx")


class _Shrink(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.hardshrink(x.to(torch.float32), 0.5) * 2


def test_program_needing_decomposition_takes_the_full_path():
    """``hardshrink`` has an ATen decomposition and no ONNX function: the retrace runs (not skipped),
    it is named as the blocking op, and the exported graph computes hardshrink."""
    import onnxruntime as ort

    ep = torch.export.export(_Shrink(), (torch.randn(3, 4),), strict=False)
    with sd.shortcuts({}):
        program = torch.onnx.export(ep, (), dynamo=True, optimize=False, verbose=False)
    assert sd.LAST["skipped"] is False
    assert "aten.hardshrink.default" in sd.LAST["blocking"]
    x = np.array([[-1.0, -0.2, 0.3, 0.9]] * 3, dtype=np.float32)  # the exported shape [3, 4]
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, [[-2.0, 0.0, 0.0, 1.8]] * 3, rtol=1e-6)


def test_to_dtype_becomes_to_copy():
    """``aten.to.dtype(x, dtype)`` is rewritten to ``aten._to_copy(x, dtype=...)`` (what the retrace makes of it)."""

    class M(torch.nn.Module):
        def forward(self, x):
            return x.to(torch.float16) + 1

    ep = torch.export.export(M(), (torch.randn(2),), strict=False)
    if not any(n.target is torch.ops.aten.to.dtype for n in ep.graph.nodes):
        pytest.skip("this torch exports .to() without aten.to.dtype")
    assert sd.to_copy(ep) == 1
    node = next(n for n in ep.graph.nodes if n.target is torch.ops.aten._to_copy.default)
    assert node.kwargs == {"dtype": torch.float16}
    assert ep.module()(torch.tensor([0.5, 2.0])).dtype == torch.float16


def test_operator_aliases_become_bitwise_ops():
    """``a & b`` / ``a | b`` on bool tensors (``aten.__and__``/``__or__``, as in the decode graph's slot
    eviction) become ``aten.bitwise_and``/``bitwise_or``: the skip is not blocked, values unchanged."""

    class M(torch.nn.Module):
        def forward(self, x):
            return ((x > 0) & (x < 2)) | (x == -1)

    ep = torch.export.export(M(), (torch.randn(5),), strict=False)
    x = torch.tensor([-1.0, 0.5, 3.0, 1.5, -2.0])
    want = ep.module()(x)
    assert sd.to_copy(ep) == 2
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert not targets & set(sd.ALIASES)
    assert torch.equal(ep.module()(x), want) and want.tolist() == [True, True, False, True, False]



def test_registry_built_once_and_copied():
    """Under ``shortcuts`` the torchlib registry is built once per opset and each export gets a copy: a custom
    translation registered on one copy is in no other, the copies hold the full registry's entries, and
    ``from_torchlib`` is the exporter's own again afterwards."""
    from torch.onnx._internal.exporter import _registration

    reg = _registration.ONNXRegistry
    own = reg.__dict__["from_torchlib"]
    full = reg.from_torchlib(opset_version=23)
    with sd.shortcuts({}):
        a = reg.from_torchlib(opset_version=23)
        a.register_op(torch.ops.aten.relu.default, lambda x: x)
        b = reg.from_torchlib(opset_version=23)
    assert reg.__dict__["from_torchlib"] is own
    assert a is not b and a.opset_version == b.opset_version == full.opset_version == 23
    assert set(b.functions) == set(full.functions)
    assert len(a.get_decomps(torch.ops.aten.relu.default)) == len(b.get_decomps(torch.ops.aten.relu.default)) + 1
    assert [m.is_custom for m in b.get_decomps(torch.ops.aten.relu.default)] == [False] * len(b.get_decomps(torch.ops.aten.relu.default))


def test_cached_registry_holds_the_lazily_loaded_ops(tmp_path):
    """A fresh process that builds the cached registry before ``torch.ao.quantization.fx._decomposed`` is imported (torch
    loads that op library lazily) still caches the registry the exporter builds after the import (full suite, 3 Dec:
    the order of the tests on one worker decided which registry the cache held)."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from torch.onnx._internal.exporter import _registration\n"
        "from graphwright.codegen.onnx import exporter_shortcuts as sd\n"
        "assert 'torch.ao.quantization.fx._decomposed' not in sys.modules\n"
        "reg = _registration.ONNXRegistry\n"
        "with sd.shortcuts({}):\n"
        "    cached = set(reg.from_torchlib(opset_version=23).functions)\n"
        "import torch.ao.quantization.fx._decomposed\n"
        "full = set(reg.from_torchlib(opset_version=23).functions)\n"
        "print(len(full - cached), len(cached - full), sum(str(k).startswith('quantized_decomposed::') for k in cached))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    missing, extra, quantized = map(int, out.stdout.split())
    assert (missing, extra) == (0, 0) and quantized == 8
