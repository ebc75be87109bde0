"""Donated decode states written in place on ONNX Runtime (``codegen/onnx/inplace_slots.py``, ``decode_rows.SPLIT_ROWS``).

Tiny Llama StreamingLLM and H2O artifacts, batch 2 left-padded, the cache evicting at every step: a decode loop that
donates its state gives the undonated loop's tokens, logits (1e-5) and kept positions after every step, and its
K/V states keep their storage from step to step (written in place); a state not donated is left as it was. The
torch runtime's tokens and kept sets are the reference. ``aliasable`` refuses hand-built graphs where the write
could run before another reader of the state, or writes another tensor.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from graphwright.codegen.onnx import inplace_slots
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.runtime import positions_from_mask
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_sets

RECIPES = ["streaming(sinks=2, window=5)", "h2o(heavy=3, recent=3)"]
STEPS = 40
LENGTHS = [12, 7]


def _step(folder) -> OnnxStep:
    meta = json.loads((folder / "graphwright.json").read_text())
    return OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])


def _loop(step, cm, donate: bool):
    """Prompt step + ``STEPS`` greedy decode steps; per step the logits, the kept sets and the K/V storage pointers."""
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=3)
    state = cm.step_graph.init_state(ids.shape[0])
    pos = positions_from_mask(mask)
    logits, state = step(ids, pos, torch.tensor([ids.shape[1] - 1]), state)
    names = [s.name for s in cm.step_graph.state]
    kv = [i for i, s in enumerate(cm.step_graph.state) if s.kind == "kv"]
    view = SimpleNamespace(step_graph=cm.step_graph)
    out, sets, ptrs, toks = [logits[:, -1]], [], [], []
    nxt_pos = pos[:, -1:] + 1
    for _ in range(STEPS):
        nxt = out[-1].argmax(-1)
        toks.append(nxt)
        logits, state = step(nxt[:, None], nxt_pos, torch.zeros(1, dtype=torch.long), state, donate_state=donate)
        nxt_pos = nxt_pos + 1
        out.append(logits[:, -1])
        sets.append(kept_sets(view, state))
        ptrs.append([state[i].data_ptr() for i in kv])
    assert len(names) == len(state)
    return torch.stack(out), torch.stack(toks, 1), sets, ptrs


@pytest.fixture(scope="module", params=RECIPES)
def artifact(request, onnx_artifact):
    return onnx_artifact("tiny-llama", request.param)


def test_the_decode_graph_writes_every_kv_state_after_its_readers(artifact):
    cm, folder = artifact
    step = _step(folder)
    kv = {s.name for s in cm.step_graph.state if s.kind == "kv"}
    assert kv and set(step.decode["alias"]) == kv


def test_donated_decode_equals_the_undonated_one_and_writes_in_place(artifact):
    cm, folder = artifact
    got = _loop(_step(folder), cm, donate=True)
    want = _loop(_step(folder), cm, donate=False)
    assert torch.equal(got[1], want[1])
    assert (got[0] - want[0]).abs().max().item() <= 1e-5
    assert got[2] == want[2]
    # the torch runtime's tokens and kept sets (the reference)
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=3)
    ref_sets = []
    _, ref_toks, _ = decode_loop(cm, ids, mask, STEPS, lambda i, s: ref_sets.append(kept_sets(cm, s)) if i else None)
    assert torch.equal(got[1], ref_toks)
    assert got[2] == ref_sets
    assert any(a != b for a, b in zip(got[2], got[2][1:]))  # the kept sets changed: evictions happened
    # donated: from the second decode step on (the first pads the prompt's state to capacity) the K/V buffers stay
    assert all(p == got[3][1] for p in got[3][1:])
    assert all(p != q for a, b in zip(want[3][1:], want[3][2:]) for p, q in zip(a, b))  # undonated: fresh each step


def test_an_undonated_state_is_left_as_it_was(artifact):
    cm, folder = artifact
    step = _step(folder)
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=3)
    pos = positions_from_mask(mask)
    _, state = step(ids, pos, torch.tensor([ids.shape[1] - 1]), cm.step_graph.init_state(2))
    one = torch.tensor([[5], [6]])
    _, state = step(one, pos[:, -1:] + 1, torch.zeros(1, dtype=torch.long), state, donate_state=True)  # at capacity now
    kept = [t.clone() for t in state]
    _, after = step(one, pos[:, -1:] + 2, torch.zeros(1, dtype=torch.long), state)
    assert all(torch.equal(a, b) for a, b in zip(state, kept))
    assert any(not torch.equal(a, b) for a, b in zip(after, kept))
    _, after = step(one, pos[:, -1:] + 2, torch.zeros(1, dtype=torch.long), state, donate_state=True)
    assert any(not torch.equal(a, b) for a, b in zip(state, kept))  # donated: written in place


def _graph(order_dependent: bool, other_target: bool = False):
    """k -> (MatMul reading k) and ScatterElements(k, index, row) -> k_next; with ``order_dependent`` the scatter's
    index depends on the MatMul's output (the ``after`` pattern), else not."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"])]
    index = "idx"
    if order_dependent:
        nodes += [helper.make_node("ReduceMax", ["s"], ["m"], keepdims=0),
                  helper.make_node("Cast", ["m"], ["mi"], to=i64),
                  helper.make_node("Mul", ["mi", "zero"], ["z"]),
                  helper.make_node("Add", ["idx", "z"], ["idx2"])]
        index = "idx2"
    nodes.append(helper.make_node("ScatterElements", ["other" if other_target else "k", index, "row"], ["k_next"], axis=0))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, f, [4, 4]) for n in ("q", "k", "other")]
                          + [helper.make_tensor_value_info("idx", i64, [1, 4]), helper.make_tensor_value_info("row", f, [1, 4])],
                          [helper.make_tensor_value_info("s", f, [4, 4]), helper.make_tensor_value_info("k_next", f, [4, 4])],
                          [helper.make_tensor("zero", i64, [], [0])])
    return g


def test_aliasable_needs_every_other_reader_before_the_write():
    cap, kinds = {"k": {"slots": 4, "fill": 0}}, {"k": "kv"}
    assert inplace_slots.aliasable(_graph(True), cap, kinds) == ["k"]
    assert inplace_slots.aliasable(_graph(False), cap, kinds) == []  # the MatMul may run after the write
    assert inplace_slots.aliasable(_graph(True, other_target=True), cap, kinds) == []  # k_next is not written into k
    assert inplace_slots.aliasable(_graph(True), {}, kinds) == []  # not a capacity state
    assert inplace_slots.aliasable(_graph(True), cap, {"k": "positions"}) == []
    onnx.checker.check_graph(_graph(True))
