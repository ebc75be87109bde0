"""ONNX Runtime decode over the packed Ada-KV cache (``codegen/onnx/packed_decode.py``): the one-row step attends to the
appended packed buffer; the same logits and tokens as with the rewrite off and as the torch runtime."""

from __future__ import annotations

import onnx
import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx import decode_attention, packed_decode, prompt_attention
from graphwright.codegen.onnx.artifact import _load_rewrites
from graphwright.runtime.score import stream_logits
from tests.conftest import _tiny, left_padded_batch
from tests.onnx.kv_compare import assert_onnx_runs_like_torch
from tests.passes.eviction_helpers import random_headset

RECIPES = {"adaptive": ("tiny-llama", "snapkv(budget=10, window=2, heads='adaptive', floor=0.0)"),
           "pyramid": ("tiny-qwen2", "snapkv(budget=10, window=2, heads='adaptive', pyramid=20)"),
           # layer 0 has a native sliding window (8): its mask is not the plain visibility, so it keeps its attention
           "gemma3_window": ("tiny-gemma3", "snapkv(budget=10, window=2, heads='adaptive', floor=0.0)")}
GEN = dict(max_new_tokens=24, eos_token_id=[], pad_token_id=0)


def _recipe(case, tmp_path):
    if case != "scores":
        return RECIPES[case]
    path, _ = random_headset(gw.compile(_tiny("tiny-llama"), verify=False).step_graph.info, tmp_path, 2, zero_below=0.4)
    return "tiny-llama", f"snapkv(budget=10, window=2, heads='scores', gamma=3.0, headset='{path}')"


def _wide_views(proto) -> int:
    """Main-graph Expand nodes of a state input (the packed buffer widened to Hk heads)."""
    inputs = {i.name for i in proto.graph.input}
    return sum(n.op_type == "Expand" and n.input[0] in inputs for n in proto.graph.node)


@pytest.mark.parametrize("switches", [(True, True), (False, True), (False, False)], ids=["prompt+decode", "decode", "none"])
def test_every_packed_layer_reads_the_packed_buffer(onnx_artifact, switches, monkeypatch):
    cm, out = onnx_artifact(*RECIPES["adaptive"])
    monkeypatch.setattr(prompt_attention, "ENABLED", switches[0])
    monkeypatch.setattr(decode_attention, "ENABLED", switches[1])
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    layers = cm.step_graph.info.num_layers
    found = packed_decode.find(proto)
    assert len(found) == layers and len({p.k_all for p in found}) == layers
    assert _wide_views(proto) == 2 * layers  # k and v widened in the main graph, as exported
    _load_rewrites(proto)
    assert sum(n.op_type == "If" and n.name.startswith(("gw_prompt", "gw_decode", "gw_packed")) for n in proto.graph.node) == layers
    assert _wide_views(proto) == 0  # moved into the branches the one-row step does not take


def test_a_windowed_layer_keeps_its_attention(onnx_artifact):
    cm, out = onnx_artifact(*RECIPES["gemma3_window"])
    windows = cm.step_graph.info.windows
    assert windows[0] > 0 and not windows[1]
    found = packed_decode.find(onnx.load(str(out / "model.onnx"), load_external_data=False))
    assert len(found) == 1  # the global layer only: the rewrite rebuilds no window


@pytest.mark.parametrize("case", ["adaptive", "pyramid", "scores", "gemma3_window"])
def test_decode_equals_the_rewrite_off_and_torch(onnx_artifact, case, tmp_path, monkeypatch):
    cm, out = onnx_artifact(*_recipe(case, tmp_path))
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    rewritable = sum(not w for w in (cm.step_graph.info.windows or [0] * cm.step_graph.info.num_layers))
    assert len(packed_decode.find(proto)) == rewritable  # the on side below really runs the packed attention
    ids, mask = left_padded_batch(256, (54, 47), seed=6)  # prefill 24 columns, then 30 one-row steps
    monkeypatch.setattr(packed_decode, "ENABLED", False)
    off = gw.load(out)
    want, _ = stream_logits(off.step, off.state_specs, ids, mask, 24)
    monkeypatch.setattr(packed_decode, "ENABLED", True)
    on = gw.load(out)
    got, _ = stream_logits(on.step, on.state_specs, ids, mask, 24)
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5
    assert torch.equal(on.generate(ids[:, :30], attention_mask=mask[:, :30], **GEN),
                       off.generate(ids[:, :30], attention_mask=mask[:, :30], **GEN))
    assert_onnx_runs_like_torch(cm, on, {}, GEN)
