"""``torch.export`` without per-node ``tensor_meta`` (``codegen/onnx/trace_meta.py``): the same bytes, every fake
value still stored, the patch undone afterwards."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch.fx.experimental import proxy_tensor

import graphwright as gw
from graphwright.codegen.onnx import trace_meta
from graphwright.models.tiny import tiny_model


def _digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.onnx*"))}


@pytest.mark.parametrize("model, recipe", [("tiny-llama", ""), ("tiny-qwen2", "h2o(heavy=4, recent=4)")])
def test_same_bytes_with_and_without_tensor_meta(tmp_path, monkeypatch, model, recipe):
    """tiny Llama identity and tiny Qwen2 H2O (in-graph prompt eviction + decode.onnx): every ONNX file written is
    byte-identical whether torch.export stores tensor_meta or not, and both artifacts verify."""
    cm = gw.compile(tiny_model(model), recipe=recipe, verify=False)
    out = {}
    for on in (False, True):
        monkeypatch.setattr(trace_meta, "ENABLED", on)
        folder = gw.export_onnx(cm, tmp_path / str(on))
        out[on] = _digests(folder)
    assert "model.onnx" in out[True] and (recipe == "" or "decode.onnx" in out[True])
    assert out[False] == out[True]


class _Mlp(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x @ x.transpose(0, 1)).sum(0)


def test_values_kept_tensor_meta_dropped():
    """Inside ``no_tensor_meta`` every traced node still has its fake value (what the ONNX translation reads) and
    ``tensor_meta`` is None; outside, torch stores it again."""
    x = torch.randn(4, 3)
    dyn = ({0: torch.export.Dim("n", min=2)},)
    with trace_meta.no_tensor_meta() as patched:
        ep = torch.export.export(_Mlp(), (x,), dynamic_shapes=dyn, strict=False)
    assert patched
    ops = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert ops and all(isinstance(n.meta["val"], torch.Tensor) for n in ops)
    assert all(n.meta.get("tensor_meta") is None for n in ops)
    torch.testing.assert_close(ep.module()(x), _Mlp()(x))
    ep2 = torch.export.export(_Mlp(), (x,), dynamic_shapes=dyn, strict=False)
    assert all(n.meta["tensor_meta"].shape == n.meta["val"].shape for n in ep2.graph.nodes if n.op == "call_function")


def test_patch_undone_after_an_error_and_off_switch(monkeypatch):
    original = proxy_tensor._extract_tensor_metadata
    with pytest.raises(RuntimeError, match="boom"):
        with trace_meta.no_tensor_meta():
            assert proxy_tensor._extract_tensor_metadata is not original
            raise RuntimeError("boom")
    assert proxy_tensor._extract_tensor_metadata is original
    monkeypatch.setattr(trace_meta, "ENABLED", False)
    with trace_meta.no_tensor_meta() as patched:
        assert not patched and proxy_tensor._extract_tensor_metadata is original
