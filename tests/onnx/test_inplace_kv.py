"""Dense KV cache updated in place on ONNX Runtime (``codegen/onnx/inplace_kv.py``).

Tiny Llama identity export, batch 2 left-padded, a prompt step then 48 decode steps through ``OnnxStep``
with the in-place graph and with the exported Concat graph (``inplace_kv.ENABLED = False``): logits within
1e-5 and the same greedy tokens at every step, the same state values (within 1e-5: attention over more, masked,
slots sums in another order, ~1e-6 seen), buffers reused in place between bucket
boundaries (same data pointer) and grown by one copy at each (BUCKET = 8 here: several growths); the runtime's
``kv_bytes`` equal the Concat route's, ``kv_storage_bytes`` the capacity buffers'; ``generate`` gives the torch
runtime's tokens; a state fed twice (two continuations) does not corrupt the first; a graph whose cache is read
by anything but Attention is left alone, with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx import inplace_kv
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.runtime.generate import positions_from_mask
from graphwright.runtime.held_bytes import held_bytes, live_bytes
from tests.conftest import left_padded_batch

LENGTHS = [13, 6]
STEPS = 48


@pytest.fixture(scope="module")
def artifact(onnx_artifact):
    cm, folder = onnx_artifact("tiny-llama", "identity")
    return cm, folder, json.loads((folder / "graphwright.json").read_text())


def _step(folder, meta, enabled: bool, monkeypatch) -> OnnxStep:
    monkeypatch.setattr(inplace_kv, "ENABLED", enabled)
    return OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])


def _loop(step, cm, steps=STEPS, on_step=None):
    """(logits per step, tokens per step, final state): greedy prompt step + ``steps`` decode steps."""
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=3)
    B, T = ids.shape
    positions = positions_from_mask(mask)
    state = [s.empty(B, torch.device("cpu")) for s in cm.step_graph.state]
    logits, state = step(ids, positions, torch.tensor([T - 1]), state)
    pos = positions[:, -1:] + 1
    out, toks = [logits.clone()], []
    for i in range(steps):
        nxt = logits[:, -1].argmax(-1)
        toks.append(nxt)
        logits, state = step(nxt[:, None], pos, torch.zeros(1, dtype=torch.long), state)
        pos = pos + 1
        out.append(logits.clone())
        if on_step:
            on_step(i, state)
    return out, toks, state


def test_inplace_matches_concat_route(artifact, monkeypatch):
    cm, folder, meta = artifact
    monkeypatch.setattr(inplace_kv, "BUCKET", 8)
    concat = _step(folder, meta, False, monkeypatch)
    inplace = _step(folder, meta, True, monkeypatch)
    assert concat.inplace is None and inplace.inplace is not None, inplace.inplace_reason
    assert inplace.session.get_inputs()[-1].name == inplace_kv.WRITE_INDEX
    ptrs = []
    la, ta, sa = _loop(concat, cm)
    lb, tb, sb = _loop(inplace, cm, on_step=lambda i, st: ptrs.append([t.data_ptr() for t in st]))
    assert len(lb) == STEPS + 1
    for x, y in zip(la, lb):
        assert (x - y).abs().max().item() < 1e-5
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))
    T = max(LENGTHS)
    for a, b, spec in zip(sa, sb, cm.step_graph.state):
        assert a.shape == b.shape and a.shape[spec.seq_dim] == T + STEPS
        assert torch.equal(a, b) if a.dtype == torch.int64 else (a - b).abs().max().item() < 1e-5
        # the view's buffer: capacity the next multiple of BUCKET (the last step filled slot T + STEPS - 1)
        cap = -(-(T + STEPS) // 8) * 8
        assert b.untyped_storage().nbytes() == b.numel() // b.shape[spec.seq_dim] * cap * b.element_size()
    # in place between boundaries: a state's buffer changes only when a step passes a multiple of BUCKET
    for i in range(1, STEPS):
        length = T + i + 1  # slots filled after decode step i
        grew = (length - 1) % 8 == 0
        assert (ptrs[i] != ptrs[i - 1]) == grew, (i, length)
    # runtime accounting: live bytes as the Concat route, storage = the buffers
    assert live_bytes(sb, cm.step_graph.state) == live_bytes(sa, cm.step_graph.state)
    kv_storage = sum(b.untyped_storage().nbytes() for b, s in zip(sb, cm.step_graph.state) if s.kind == "kv")
    assert held_bytes(sb, cm.step_graph.state)["kv_storage_bytes"] == kv_storage > live_bytes(sb, cm.step_graph.state)


def test_generate_equals_torch_runtime_and_stats(artifact, monkeypatch):
    cm, folder, _ = artifact
    monkeypatch.setattr(inplace_kv, "BUCKET", 16)
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=5)
    monkeypatch.setattr(inplace_kv, "ENABLED", False)
    m_cat = gw.load(folder)
    monkeypatch.setattr(inplace_kv, "ENABLED", True)
    m_in = gw.load(folder)
    assert m_in.step.inplace is not None
    want = cm.generate(ids, max_new_tokens=STEPS, attention_mask=mask, eos_token_id=[])
    got = m_in.generate(ids, max_new_tokens=STEPS, attention_mask=mask, eos_token_id=[])
    ref = m_cat.generate(ids, max_new_tokens=STEPS, attention_mask=mask, eos_token_id=[])
    assert torch.equal(got, want) and torch.equal(got, ref)
    a, b = m_cat.last_stats, m_in.last_stats
    assert a["kv_bytes"] == b["kv_bytes"] and a["kept_tokens_per_head"] == b["kept_tokens_per_head"]
    length = ids.shape[1] + STEPS - 1
    per_token = a["kv_bytes"] // length
    assert b["kv_storage_bytes"] == per_token * (-(-length // 16) * 16) >= a["kv_storage_bytes"]


def test_state_fed_twice_is_not_corrupted(artifact, monkeypatch):
    """Two continuations of one state: the second is copied (its buffer was written past it), the first kept."""
    cm, folder, meta = artifact
    monkeypatch.setattr(inplace_kv, "BUCKET", 64)
    concat = _step(folder, meta, False, monkeypatch)
    inplace = _step(folder, meta, True, monkeypatch)
    _, _, base = _loop(inplace, cm, steps=2)
    _, _, base_c = _loop(concat, cm, steps=2)
    pos = torch.tensor([[max(LENGTHS) + 2]] * 2) - torch.tensor([[max(LENGTHS) - n] for n in LENGTHS])
    x, y = torch.tensor([[7], [9]]), torch.tensor([[11], [12]])
    zero = torch.zeros(1, dtype=torch.long)
    lx, sx = inplace(x, pos, zero, base)
    kept = [t.clone() for t in sx]
    ly, sy = inplace(y, pos, zero, base)  # same starting state again
    cx, _ = concat(x, pos, zero, base_c)
    cy, _ = concat(y, pos, zero, base_c)
    assert (lx - cx).abs().max().item() < 1e-5 and (ly - cy).abs().max().item() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(sx, kept))
    assert sy[1].data_ptr() != sx[1].data_ptr()


def test_not_a_dense_append_keeps_the_concat_graph(tmp_path):
    """A cache read by anything but Attention (here a ReduceSum of the keys) is not rewritten; the reason names it."""
    import onnx
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [helper.make_node("Concat", ["k0", "new"], ["k0_next"], axis=2),
             helper.make_node("ReduceSum", ["k0_next"], ["logits"], keepdims=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("positions", TensorProto.INT64, [1, "T"]),
                                       helper.make_tensor_value_info("k0", f, [1, 2, "S", 4]),
                                       helper.make_tensor_value_info("new", f, [1, 2, "T", 4])],
                          [helper.make_tensor_value_info("logits", f, None), helper.make_tensor_value_info("k0_next", f, None)])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    proto, why = inplace_kv.rewrite(tmp_path / "m.onnx", ["k0"], ["kv"], [2])
    assert proto is None and "ReduceSum" in why
    proto, why = inplace_kv.rewrite(tmp_path / "m.onnx", ["k0"], ["kv"], [1])
    assert proto is None and "axis 2 is not its seq dim 1" in why
    proto, why = inplace_kv.rewrite(tmp_path / "m.onnx", ["k0"], ["summary"], [2])
    assert proto is None and "kv/positions" in why


def _reshape_graph(shape: list):
    """k0 -> Concat -> k0_next -> Reshape(shape) -> Attention's key (the per-KV-head layout of SnapKV's decode graph)."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [helper.make_node("Concat", ["k0", "new"], ["k0_next"], axis=2),
             helper.make_node("Reshape", ["k0_next", "shape"], ["k_r"]),
             helper.make_node("Attention", ["q", "k_r", "k_r"], ["logits"])]
    return helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("positions", TensorProto.INT64, [1, "T"]),
                     helper.make_tensor_value_info("q", f, [2, 1, "T", 4]),
                     helper.make_tensor_value_info("k0", f, [1, 2, "S", 4]),
                     helper.make_tensor_value_info("new", f, [1, 2, "T", 4])],
        [helper.make_tensor_value_info("logits", f, None), helper.make_tensor_value_info("k0_next", f, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [len(shape)], shape)])


@pytest.mark.parametrize("shape, ok", [([-1, 1, 0, 0], True), ([2, 1, 0, 0], True), ([-1, 1, 0, 4], False),
                                       ([2, 1, -1, 4], False), ([0, 0, 0, 0], True)])
def test_a_reshape_that_keeps_the_seq_dim_passes_through(tmp_path, shape, ok):
    """The cache reaches Attention through a Reshape of a constant target whose seq dim and trailing dims are copied (0):
    still width-independent, rewritten; a target that fixes or infers a dim from the seq dim on is refused, naming it."""
    import onnx
    from onnx import helper

    onnx.save(helper.make_model(_reshape_graph(shape), opset_imports=[helper.make_opsetid("", 23)]), tmp_path / "m.onnx")
    proto, why = inplace_kv.rewrite(tmp_path / "m.onnx", ["k0"], ["kv"], [2])
    assert (proto is not None) == ok and (why is None) == ok
    if not ok:
        assert "Reshape" in why


def test_snapkv_decode_appends_in_place(onnx_artifact, monkeypatch):
    """SnapKV's decode graph (per-KV-head keys reach Attention through a Reshape [-1, 1, 0, 0]) appends in place:
    the same tokens and logits (1e-5) as the exported Concat decode graph over 40 steps, buffers reused."""
    cm, folder = onnx_artifact("tiny-llama", "snapkv(budget=8, window=2)")
    meta = json.loads((folder / "graphwright.json").read_text())
    on = _step(folder, meta, True, monkeypatch)
    assert on.decode["inplace"] is not None, on.decode["inplace_reason"]
    ptrs = []
    lx, tx, _ = _loop(on, cm, steps=40, on_step=lambda i, s: ptrs.append(s[0].data_ptr()))
    off = _step(folder, meta, False, monkeypatch)
    assert off.decode["inplace"] is None
    ly, ty, _ = _loop(off, cm, steps=40)
    assert all(torch.equal(a, b) for a, b in zip(tx, ty))
    assert max((a - b).abs().max().item() for a, b in zip(lx, ly)) < 1e-5
    assert len(set(ptrs)) < len(ptrs) // 4  # one buffer per BUCKET steps, not a copy per step
