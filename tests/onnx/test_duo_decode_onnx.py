"""DuoAttention's ONNX decode step: retrieval caches appended in place, one slot index / key-position row per step.

``inplace_kv.rewrite_decode`` (switch ``inplace_kv.DECODE``) turns decode.onnx's appends of the states without a
slot capacity (the retrieval heads' K/V and the shared key positions) into ScatterElements at ``kv_write_index``
on capacity buffers bound in place; ``decode_rows.DUO_ROWS`` makes the streaming heads' slot index once per
(sinks, window, head count) and their attention read one [B, S + 1] key-position row. Tiny Llama with a split
layer (1 retrieval + 1 streaming KV head) and an all-streaming layer (2 streaming heads), batch 2 left-padded, a
prompt step then 120 greedy decode steps (the streaming heads evict at every step): the default artifact and
every switch setting (the in-place decode off; the session-12 graph exported with ``DUO_ROWS = False``) give the
torch runtime's tokens, its logits within 1e-4 and its kept positions per (row, layer, head) after every step;
the retrieval buffers are reused in place between bucket boundaries and the streaming attentions read 2-D positions.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest
import torch

import graphwright as gw
from graphwright.capture.ops import ATTENTION
from graphwright.codegen.onnx import decode_rows, inplace_kv
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.codegen.onnx.decode_rows import key_positions, rows_at, slot_index, streaming_rows
from graphwright.codegen.onnx.decode_slots import decode_graph, pad_to_capacity
from graphwright.ops import schema
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, state_of

RECIPE = "duo(retrieval=[[0, 0]], sinks=2, window=4)"  # test_duo_packed_onnx.py's "duo" case: the export is shared
LENGTHS = [12, 7]
STEPS = 120
POSITIONS = ("key_positions", "duo_positions0", "key_positions1")  # retrieval (all heads' rows), layer 0's, layer 1's


def _sets(m, state) -> list:
    """Per positions state, [B][heads] sorted kept positions (the retrieval heads' [B, S] state as one head)."""
    rows = [state_of(m, state, n) for n in POSITIONS]
    return [[[sorted(h) for h in row] for row in kept_positions(p.reshape(p.shape[0], -1, p.shape[-1]))] for p in rows]


def _run(m, cm, on_step=None):
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=4)
    sets = []

    def record(i, state):
        sets.append(_sets(m, state))
        if on_step:
            on_step(i, state)

    logits, toks, state = decode_loop(m, ids, mask, STEPS, record)
    return logits, toks, sets, state


def _onnx(cm, folder, decode_inplace: bool, monkeypatch):
    meta = json.loads((folder / "graphwright.json").read_text())
    monkeypatch.setattr(inplace_kv, "DECODE", decode_inplace)
    step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
    return SimpleNamespace(step_graph=cm.step_graph, _step=step), meta


@pytest.fixture(scope="module")
def torch_run(onnx_artifact):
    cm, folder = onnx_artifact("tiny-llama", RECIPE)
    return cm, folder, _run(cm, cm)


def _assert_like_torch(got, want):
    logits, toks, sets, _ = got
    assert sets == want[2]  # kept positions per (row, head) of every positions state after the prompt and every step
    assert torch.equal(toks, want[1])
    assert (logits - want[0]).abs().max().item() <= 1e-4


def test_default_artifact_decodes_like_torch_in_place(torch_run, monkeypatch):
    cm, folder, want = torch_run
    m, meta = _onnx(cm, folder, True, monkeypatch)
    d = m._step.decode
    assert d["inplace_reason"] is None
    names = [m._step.state_names[i] for i in d["inplace"][0]]
    assert names == ["key_positions", "k0", "v0"]  # the appended states; the streaming caches keep their slots
    assert set(meta["decode"]["capacity"]) == {"duo_k0", "duo_v0", "duo_positions0", "k1", "v1", "key_positions1"}
    monkeypatch.setattr(inplace_kv, "BUCKET", 8)  # several capacity growths over the run
    ptrs = []
    got = _run(m, cm, lambda i, s: ptrs.append((state_of(m, s, "k0").shape[2], state_of(m, s, "k0").data_ptr())))
    _assert_like_torch(got, want)
    # the streaming heads evicted at every step: row 1 (7 real tokens) keeps its 2 sinks and the last 4 positions
    assert got[2][-1][1][1][0] == [0, 1] + list(range(STEPS + 7 - 4, STEPS + 7))
    # retrieval buffers: the same memory between bucket boundaries, one copy into a larger buffer at each
    moved = [i for i in range(2, len(ptrs)) if ptrs[i][1] != ptrs[i - 1][1]]
    assert moved and all(ptrs[i][0] % 8 == 1 for i in moved), (moved, ptrs[:3])
    assert moved == [i for i in range(2, len(ptrs)) if ptrs[i][0] % 8 == 1]  # every boundary moves, nothing else


def test_concat_decode_graph_decodes_the_same(torch_run, monkeypatch):
    """``inplace_kv.DECODE = False``: decode.onnx as exported (its Concat appends), same tokens, logits and sets."""
    cm, folder, want = torch_run
    m, _ = _onnx(cm, folder, False, monkeypatch)
    assert m._step.decode["inplace"] is None and "off" in m._step.decode["inplace_reason"]
    _assert_like_torch(_run(m, cm), want)


def test_per_layer_rows_artifact_decodes_the_same(torch_run, tmp_path, monkeypatch):
    """``decode_rows.DUO_ROWS = False`` (session 12's decode graph, kept for A/B): per-layer slot and per-head key
    positions for the streaming heads; with and without the in-place appends it decodes as torch does. The default
    graph's streaming attentions read one 2-D position row, made once (one Gather of head 0), and build their mask
    once: fewer visibility nodes than the per-head graph."""
    cm, folder, want = torch_run
    monkeypatch.setattr(decode_rows, "DUO_ROWS", False)
    old = gw.export_onnx(cm, tmp_path / "per_layer")
    for decode_inplace in (True, False):
        m, _ = _onnx(cm, old, decode_inplace, monkeypatch)
        _assert_like_torch(_run(m, cm), want)
    ops = {f: [n.op_type for n in onnx.load(str(g / "decode.onnx"), load_external_data=False).graph.node]
           for f, g in (("new", folder), ("old", old))}
    for op in ("LessOrEqual", "Or", "And"):  # the per-head visibility of each streaming attention
        assert ops["new"].count(op) < ops["old"].count(op), (op, ops["new"].count(op), ops["old"].count(op))
    assert ops["new"].count("Attention") == ops["old"].count("Attention") == 3
    assert len(ops["new"]) < len(ops["old"])


@pytest.mark.parametrize("shared", [True, False])
def test_decode_graph_shares_the_streaming_heads_rows(torch_run, shared, monkeypatch):
    """The decode graph (``decode_rows.rows``): with ``DUO_ROWS`` each streaming eviction is ``rows_at`` on a slot
    index made once per streaming head count (1 in layer 0, 2 in layer 1: two), and every attention reads 2-D key
    positions (the retrieval heads' state, the streaming heads' one shared ``key_positions`` row); without it,
    per-layer ``streaming_rows`` and per-head positions. Its eager run equals the unrewritten graph's."""
    cm = torch_run[0]
    monkeypatch.setattr(decode_rows, "DUO_ROWS", shared)
    sg = cm.step_graph
    gm, capacity, _, _ = decode_graph(sg.gm, sg.state)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    attn = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION]
    k_pos = [schema.get(n, "k_pos") for n in attn]
    if shared:
        assert targets.count(rows_at) == 2 and targets.count(slot_index) == 2 and targets.count(key_positions) == 1
        assert targets.count(streaming_rows) == 0
        assert k_pos[0].op == "call_function" and k_pos[1].target is key_positions and k_pos[2] is k_pos[1]
    else:
        assert targets.count(streaming_rows) == 2 and not {rows_at, slot_index, key_positions} & set(targets)
        assert all(p.target is torch.ops.aten.cat.default for p in k_pos)
    # eager: the rewritten graph on a decode state whose streaming heads hold one position row per batch row
    monkeypatch.setattr(decode_rows, "DUO_ROWS", False)
    plain, _, _, _ = decode_graph(sg.gm, sg.state)
    ids, mask = left_padded_batch(sg.info.vocab_size, LENGTHS, seed=4)
    states = []
    m, _ = _onnx(cm, torch_run[1], False, monkeypatch)  # the state in the step graph's layout, streaming caches full
    decode_loop(m, ids, mask, 9, lambda i, s: states.append([t.clone() for t in s]))
    state = pad_to_capacity(states[-1], [s.name for s in sg.state], [s.seq_dim for s in sg.state], capacity)
    nxt, pos = torch.tensor([[5], [7]]), torch.tensor([[21], [16]])  # rows of 12 and 7 real tokens, 9 steps later
    a = gm(nxt, pos, torch.zeros(1, dtype=torch.long), *state)
    b = plain(nxt, pos, torch.zeros(1, dtype=torch.long), *state)
    for x, y in zip(a, b):
        assert x.shape == y.shape and (x.float() - y.float()).abs().max() <= 1e-5



def test_appended_states_of_different_widths_fall_back_to_the_exported_graph(torch_run, monkeypatch):
    """One ``kv_write_index`` serves every in-place state: states of different widths (no known recipe) switch the
    step to the decode graph as exported, for good, saying why."""
    from graphwright.codegen.onnx.artifact import _one_width

    cm, folder, _ = torch_run
    m, _ = _onnx(cm, folder, True, monkeypatch)
    d, step = m._step.decode, m._step
    idx = d["inplace"][0]
    state = [torch.zeros(2, 5) if s.seq_dim == 1 else torch.zeros(2, max(s.shape[1], 1), 5, 16) for s in cm.step_graph.state]
    assert _one_width(state, idx, step.seq_dims, d) and d["inplace"] is not None
    state[idx[1]] = torch.zeros(2, 1, 6, 16)
    before = d["session"]
    assert not _one_width(state, idx, step.seq_dims, d)
    assert d["inplace"] is None and "different widths [5, 6]" in d["inplace_reason"] and d["session"] is not before
    assert [i.name for i in d["session"].get_inputs()] == d["inputs"]  # the exported graph: no kv_write_index
