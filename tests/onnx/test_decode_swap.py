"""``decode.onnx`` of an H2O recipe as ``model.onnx`` with its slot functions swapped (``codegen/onnx/decode_swap.py``).

The swapped graph against the decode graph exported layer by layer (tokens, logits, state over 40
steps) is ``test_slot_functions.py::test_stitched_equals_layer_by_layer`` (both H2O recipes); here:
the decode function's example, which decode graphs qualify, what the swapped graph is (no second
body export, one shared weights file, the decode function's nodes), and that a failure of the swap
exports the decode graph the long way with a note, the artifact verifying either way."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx import decode_slots, decode_swap, slot_functions
from graphwright.codegen.onnx.decode_slots import decode_graph
from graphwright.codegen.onnx.prompt_slots import prompt_graph
from graphwright.codegen.onnx.streaming_shift import shift_streaming
from tests.conftest import _tiny, left_padded_batch

H2O = "h2o(heavy=4, recent=4)"


@pytest.fixture(autouse=True)
def plain_decode_functions(monkeypatch):
    """The swap route is taken when the decode graph's functions are the prompt functions' partners, i.e. with
    ``decode_slots.ROWS`` off (decode_rows.py fuses H2O's attention into its function; see the test below)."""
    monkeypatch.setattr(decode_slots, "ROWS", False)


def _export(tmp_path, recipe):
    """A fresh export (not the session-cached ``onnx_artifact``: these artifacts are made with ROWS off)."""
    cm = gw.compile(_tiny("tiny-llama"), recipe=recipe, verify=False)
    return cm, gw.export_onnx(cm, tmp_path / "export")


def test_decode_rows_graphs_take_the_traced_route(monkeypatch):
    """With decode_rows on (the default), H2O's decode layers with a token recent budget are one attention + eviction
    function: not a swap. A fraction recent budget can be 0 slots at a short length (the new token may be the victim),
    so decode_rows leaves that layer's partner function alone and the swap still applies."""
    monkeypatch.setattr(decode_slots, "ROWS", True)
    for recipe in (H2O, "duo(retrieval=[[0, 0]], sinks=2, window=4)"):
        assert not decode_swap.swappable(*_graphs(recipe)), recipe
    assert decode_swap.swappable(*_graphs("h2o(heavy=0.25, recent=0.25)"))


def test_decode_example_is_one_query_token_and_a_score_one_slot_short():
    # h2o_prompt(q, k, v, q_pos, k_pos, score, scale, ...) as the fake kernel records it: T = 3, S = 8, score state 5
    entry = {"params": ["q", "k", "v", "q_pos", "k_pos", "score", "scale"],
             "template": [("t", 0), ("t", 1), ("t", 2), ("t", 3), ("t", 4), ("t", 5), ("c", 0.125)],
             "example": [(torch.float32, [2, 4, 3, 8], [0, 2]), (torch.float32, [2, 2, 8, 8], [0, 2]),
                         (torch.float32, [2, 2, 8, 8], [0, 2]), (torch.int64, [2, 3], [0, 1]),
                         (torch.int64, [2, 2, 8], [0, 2]), (torch.float32, [2, 2, 5], [0, 2])]}
    got = decode_swap.decode_example(entry)
    assert got == [(torch.float32, [2, 4, 1, 8], [0]), (torch.float32, [2, 2, 8, 8], [0, 2]),
                   (torch.float32, [2, 2, 8, 8], [0, 2]), (torch.int64, [2, 1], [0]),
                   (torch.int64, [2, 2, 8], [0, 2]), (torch.float32, [2, 2, 7], [0, 2])]
    # the decode function runs on it: k, v, k_pos and score cut to the 7 slots of the state
    args, _ = slot_functions.export_example("k", got)
    from graphwright.codegen.onnx.decode_slots import h2o_decode

    q_pos = torch.full((2, 1), 7)
    k_pos = torch.arange(8).expand(2, 2, 8).contiguous()
    out = h2o_decode(args[0], args[1], args[2], q_pos, k_pos, args[5], 0.125, 2, 0.0, 2, 0.0)
    assert [list(t.shape) for t in out] == [[2, 2, 7, 8], [2, 2, 7, 8], [2, 2, 7], [2, 2, 7]]


def _graphs(recipe):
    sg = gw.compile(_tiny("tiny-llama"), recipe=recipe, verify=False).step_graph
    _, prompt = prompt_graph(shift_streaming(sg.gm, decode=False)[0], sg.state)
    gm, capacity, in_graph, left = decode_graph(shift_streaming(sg.gm, decode=True)[0], sg.state)
    return gm, capacity, in_graph, left, prompt


def test_only_h2o_decode_graphs_are_swappable():
    assert decode_swap.swappable(*_graphs(H2O))
    assert decode_swap.swappable(*_graphs("h2o(heavy=0.25, recent=0.25)"))
    assert decode_swap.swappable(*_graphs("duo(retrieval=[[0, 0]], sinks=2, window=4)"))  # streaming heads, no shift
    assert decode_swap.swappable(*_graphs("duo(retrieval=[[0, 0]], sinks=2, window=4) + h2o(heavy=4, recent=3)"))
    # StreamingLLM's decode attention is not the prompt step's; SnapKV appends (decode_derive.py); FastGen is split
    # at the prompt step; a latent cache is split at the prompt step
    for recipe in ("streaming(sinks=2, window=6)", "snapkv(budget=8)", "fastgen()", "lowrank_kv(keep=0.8) + h2o(heavy=4, recent=4)"):
        assert not decode_swap.swappable(*_graphs(recipe)), recipe


def test_a_decode_graph_with_any_other_function_is_not_swapped():
    """A decode rewrite that is not a partner swap (here one layer's h2o_decode replaced by another function, as a fused
    attention + eviction would be) makes the export take the traced route."""
    gm, capacity, in_graph, left, prompt = _graphs(H2O)

    def fused_rows(*args):
        return args

    node = next(n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "h2o_decode")
    node.target = fused_rows
    assert not decode_swap.swappable(gm, capacity, in_graph, left, prompt)


def test_swapped_decode_graph_is_model_onnx_with_decode_functions(tmp_path):
    cm, out = _export(tmp_path, H2O)
    meta = json.loads((out / "graphwright.json").read_text())
    phases, notes = meta["export"]["phases"], meta["export"]["notes"]
    assert meta["decode"]["derived_from"] == "model.onnx" and meta["decode"]["shares_weights"]
    assert "decode_swap" in phases and "decode_torch_export" not in phases and "decode_onnx_translate" not in phases
    assert notes["decode_derive"].startswith("slot functions swapped: h2o_decode_")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".data") == ["model.onnx.data"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    decode = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
    # the same body and weights: every initializer of decode.onnx is model.onnx's, pointing into model.onnx.data
    inits = {t.name: t for t in model.initializer}
    assert {t.name for t in decode.initializer} <= set(inits)
    assert all(d.value == "model.onnx.data" for t in decode.initializer for d in t.external_data if d.key == "location")
    assert [o.name for o in decode.output] == [o.name for o in model.output] == meta["decode"]["outputs"]
    # the prompt function (TopK ranks and compaction) is replaced by the decode one (ArgMax victim, no TopK)
    assert any(n.op_type == "TopK" for n in model.node) and not any(n.op_type == "TopK" for n in decode.node)
    assert not any(n.domain == slot_functions.DOMAIN for n in decode.node) and not decode_swap_functions(out)
    # each <state>_next of decode.onnx has its <state> input's type (the slots keep their width)
    ins = {i.name: i.type for i in decode.input}
    for o in decode.output[1:]:
        assert o.type == ins[o.name[:-len("_next")]]
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=3)
    gen = dict(max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    assert torch.equal(gw.load(out).generate(ids, attention_mask=mask, **gen), cm.generate(ids, attention_mask=mask, **gen))


def decode_swap_functions(out):
    return list(onnx.load(str(out / "decode.onnx"), load_external_data=False).functions)


def test_a_failed_swap_exports_the_decode_graph(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("injected swap failure")

    monkeypatch.setattr(decode_swap, "derive_swapped", broken)
    cm = gw.compile(_tiny("tiny-llama"), recipe=H2O, verify=False)
    before = set(slot_functions.KEYS)
    out = gw.export_onnx(cm, tmp_path / "export")
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["export"]["notes"]["decode_swap"] == "exported (ValueError: injected swap failure)"
    assert meta["decode"]["derived_from"] is None and "decode_torch_export" in meta["export"]["phases"]
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    assert set(slot_functions.KEYS) == before


def test_duo_decode_graph_is_swapped(tmp_path):
    """DuoAttention's streaming heads (ordinary attention, no position shift): decode.onnx swaps streaming_prompt for
    streaming_decode; the artifact generates the torch runtime's tokens (also test_duo_packed_onnx.py)."""
    cm, out = _export(tmp_path, "duo(retrieval=[[0, 0]], sinks=2, window=4)")
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["decode"]["derived_from"] == "model.onnx" and "decode_torch_export" not in meta["export"]["phases"]
    assert meta["export"]["notes"]["decode_derive"].startswith("slot functions swapped: streaming_decode_")
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=4)
    gen = dict(max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    assert torch.equal(gw.load(out).generate(ids, attention_mask=mask, **gen), cm.generate(ids, attention_mask=mask, **gen))
