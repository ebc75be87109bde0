"""StreamingLLM in the ONNX artifact without re-rotating cached keys (``codegen/onnx/streaming_shift.py``).

The artifact caches keys rotated at their absolute positions; ``decode.onnx`` rotates only the query
(back by the tokens evicted so far, for the sinks) and ranks nothing. Against the torch backend with
the compacting references and the step graph's pre-RoPE cache: same kept position sets per (row, KV
head) after every step, same greedy tokens, logits within 1e-4, over 120 decode steps with eviction
at every step (batch 2, left-padded); the cached keys are the reference's rotated at their positions.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest
import torch

from graphwright.capture.ops import ATTENTION
from graphwright.codegen.onnx import decode_rows
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.codegen.onnx.decode_rows import (
    back_rotation,
    key_positions,
    rows_at,
    sink_index,
    sink_keys,
    sink_keys_at,
    sink_rotation,
    slot_index,
    streaming_attend_rows,
    streaming_attend_slots,
    streaming_rows,
)
from graphwright.codegen.onnx.decode_slots import decode_graph, position_rank, rope_cache_index_decode
from graphwright.codegen.onnx.streaming_shift import shift_streaming, shifted_decode_attention
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction import ROPE_CACHE_INDEX, ROPE_INVERT
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, decode_loop, kept_sets, state_of
from tests.passes.streaming_cases import assert_keys_rotated_at_positions, reference_layer, unordered_slot_case

RECIPE = "streaming(sinks=2, window=6)"  # the registry's setting (test_onnx_eviction_slots.py): the export is shared
LENGTHS = [12, 7]
STEPS = 120


@pytest.fixture(scope="module")
def runs(onnx_artifact):
    cm, folder = onnx_artifact("tiny-llama", RECIPE)
    meta = json.loads((folder / "graphwright.json").read_text())
    step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
    models = {"onnx": SimpleNamespace(step_graph=cm.step_graph, _step=step), "ref": CompiledModel(cm.step_graph, backend=COMPACTING)}
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=4)
    out = {"meta": meta, "folder": folder, "cm": cm}
    for name, m in models.items():
        sets = []
        logits, toks, state = decode_loop(m, ids, mask, STEPS, lambda i, s, m=m, sets=sets: sets.append(kept_sets(m, s)))
        out[name] = (logits, toks, sets, state)
    return out


def test_artifact_keeps_the_reference_sets_tokens_and_logits(runs):
    onnx_run, ref = runs["onnx"], runs["ref"]
    assert runs["meta"]["decode"]["streaming_shift"] == [0, 1]
    assert onnx_run[2] == ref[2]
    assert onnx_run[2][-1][0][1][0] == [0, 1] + list(range(STEPS + 7 - 6, STEPS + 7))  # layer 0, row 1, head 0: evicts at every step
    assert torch.equal(onnx_run[1], ref[1])
    assert (onnx_run[0] - ref[0]).abs().max() <= 1e-4


def test_per_layer_rows_artifact_decodes_the_same(runs, tmp_path, monkeypatch):
    """``decode_rows.SHARED_ROWS = False`` (each layer finds its own slots, session 11's graph, kept for A/B) exports
    an artifact with the same kept sets and tokens as the shared one (and the reference), logits within 1e-4; its
    decode graph has per-layer ``sink_keys``/``streaming_rows`` and no shared index."""
    import graphwright as gw

    monkeypatch.setattr(decode_rows, "SHARED_ROWS", False)
    cm = runs["cm"]
    folder = gw.export_onnx(cm, tmp_path / "per_layer")
    meta = json.loads((folder / "graphwright.json").read_text())
    step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
    m = SimpleNamespace(step_graph=cm.step_graph, _step=step)
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=4)
    sets = []
    logits, toks, _ = decode_loop(m, ids, mask, STEPS, lambda i, s: sets.append(kept_sets(m, s)))
    assert sets == runs["ref"][2] == runs["onnx"][2]
    assert torch.equal(toks, runs["onnx"][1]) and torch.equal(toks, runs["ref"][1])
    assert (logits - runs["ref"][0]).abs().max() <= 1e-4
    shared = [n.op_type for n in onnx.load(str(runs["folder"] / "decode.onnx"), load_external_data=False).graph.node]
    per_layer = [n.op_type for n in onnx.load(str(folder / "decode.onnx"), load_external_data=False).graph.node]
    assert shared.count("ArgMin") == 1 and per_layer.count("ArgMin") == 2  # the slot written: once vs per layer
    assert shared.count("ArgMax") == 1 and per_layer.count("ArgMax") == 2  # the sinks' slots


def test_the_artifact_caches_keys_rotated_at_their_positions(runs):
    cm = runs["cm"]
    inv = cm.step_graph.gm.get_buffer("hf.model.rotary_emb.inv_freq")
    for layer in range(2):
        kp_o, kp_r = (state_of(cm, runs[n][3], f"key_positions{layer}") for n in ("onnx", "ref"))
        k_o, k_r = (state_of(cm, runs[n][3], f"k{layer}") for n in ("onnx", "ref"))
        # fp32 RoPE in ORT vs torch: 5e-5; unrotated keys differ by O(1)
        assert_keys_rotated_at_positions(kp_o, k_o, kp_r, k_r, inv, kept=8, tol=5e-5)


def test_decode_graph_rotates_no_key_and_ranks_nothing(runs):
    cm = runs["cm"]
    sg = cm.step_graph
    shifted, layers = shift_streaming(sg.gm, decode=True)
    gm, _, in_graph, left = decode_graph(shifted, sg.state)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert layers == [0, 1] and left == [] and len(in_graph) == 2
    # decode_rows.SINK_KEYS (default): each layer's sinks rotated forward by E, the rotation made once for both
    # layers; no back rotation; SHARED_ROWS (default): the slot written and the sinks' slots made once for both
    # layers; SPLIT_ROWS (default): each layer's attention over its old slots (read in place, the sinks' scores from
    # their rotated keys) and the new row, and its slot write, in one streaming_attend_slots
    assert targets.count(shifted_decode_attention) == 0 and targets.count(streaming_attend_rows) == 0
    assert targets.count(streaming_attend_slots) == 2 and targets.count(sink_rotation) == 1
    assert targets.count(back_rotation) == targets.count(sink_keys_at) == targets.count(rows_at) == 0
    assert targets.count(ATTENTION) == 0 and targets.count(key_positions) == 0
    assert targets.count(slot_index) == targets.count(sink_index) == 1
    assert targets.count(sink_keys) == targets.count(streaming_rows) == 0
    assert not {ROPE_CACHE_INDEX, ROPE_INVERT, rope_cache_index_decode, position_rank} & set(targets)
    # decode.onnx: one decomposed attention per layer (a Softmax, no Attention node), and one [D, D] rotation
    # product per layer (the sinks' keys [s, D]), none on a query
    dec = onnx.load(str(runs["folder"] / "decode.onnx"), load_external_data=False)
    ops = [n.op_type for n in dec.graph.node]
    assert "Attention" not in ops and ops.count("Softmax") == 2
    producer = {o: n for n in dec.graph.node for o in n.output}
    rotations = [n for n in dec.graph.node if n.op_type == "MatMul" and n.input[0] in producer
                 and producer[n.input[0]].op_type == "GatherElements"]
    assert len(rotations) == 2  # the sinks' gathered keys by R(E), one per layer
    # the K/V state is read by one MatMul (the scores, or P @ V) and written by one ScatterElements: no copy
    k0 = [n.op_type for n in dec.graph.node if "k0" in n.input]
    assert sorted(k0) == ["GatherElements", "MatMul", "ScatterElements"] or sorted(k0) == [
        "FusedMatMul", "GatherElements", "ScatterElements"] or sorted(k0) == ["GatherElements", "ScatterElements", "Transpose"]
    # in decode.onnx no rotation angle is computed from the slots' positions (only from the query's)
    angles = [n for n in dec.graph.node if n.op_type in ("Cos", "Sin")]
    assert len(angles) > 2 and all("positions" in _inputs_above(dec.graph, n) for n in angles)
    assert not any(name.startswith("key_positions") for n in angles for name in _inputs_above(dec.graph, n))


def _inputs_above(graph, node) -> set:
    """The graph inputs ``node`` depends on."""
    producer = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    seen, todo, found = set(), list(node.input), set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if x in inputs:
            found.add(x)
        elif x in producer:
            todo.extend(producer[x].input)
    return found


def test_prompt_graph_inverts_keys_at_their_positions(runs):
    sg = runs["cm"].step_graph
    gm, layers = shift_streaming(sg.gm, decode=False)
    assert layers == [0, 1]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(ROPE_CACHE_INDEX) == 2 and targets.count(ROPE_INVERT) == 2  # the queries' inversions only


@pytest.mark.parametrize("evicted", [0, 1, 37, 500])
def test_shifted_decode_attention_equals_rotation_by_cache_index(evicted):
    """Op level: unordered slots (sinks + a window of consecutive positions + empty slots), 2 rows, GQA 4:2."""
    sinks, window = 3, 6
    q_abs, k_abs, v, q_pos, k_pos, inv = unordered_slot_case(evicted, sinks, window)
    got = shifted_decode_attention(q_abs, k_abs, v, q_pos, k_pos, 0.25, None, inv, sinks, window)
    want = reference_layer(q_abs, k_abs, v, q_pos, k_pos, 0.25, inv)
    assert got.shape == (2, 4, 1, 16) and (got - want).abs().max() <= 1e-4
