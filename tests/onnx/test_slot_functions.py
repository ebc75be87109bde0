"""The decode graph's slot eviction traced once per function and stitched in (``codegen/onnx/slot_functions.py``).

The stitched ``decode.onnx`` (the default) against the same decode graph exported layer by layer
(``slot_functions.ENABLED = False``, the previous route) on tiny Llama: StreamingLLM (fixed capacity,
re-rotating cache index when the recipe has one) and H2O with fraction budgets (growing
capacity): no ``graphwright.slots`` node left, ``onnx.checker`` passes, 40 decode steps of a batch of
2 left-padded rows give the same tokens, logits within 1e-5 and the same final state. (The stitched
artifacts against the torch backend and the compacting references: ``test_onnx_eviction_slots.py``,
``test_onnx_decode_dynamic.py``.) ``wrap`` on the eager decode graph: one op per layer, layers with
equal constants share one key, same outputs as the unwrapped graph. A function shared by layers whose
sizes differ is exported on the largest (a dynamic dim of size 1 would be specialised), and any failure of
the stitched route falls back to the layer-by-layer export of that graph with a note (the artifact verifies);
a failure of both routes is raised.
"""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import onnx
import pytest
import torch

import graphwright as gw
from graphwright.capture.step_graph import positions_from_mask
from graphwright.codegen.onnx import decode_slots, slot_functions
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.codegen.onnx.decode_slots import decode_graph, pad_to_capacity
from graphwright.codegen.onnx.prompt_slots import prompt_graph
from tests.conftest import _tiny, left_padded_batch
from tests.passes.eviction_helpers import decode_loop

# prompt steps: streaming / h2o counts (width min(S, c)) / h2o fractions and snapkv (data-dependent width);
# decode: fixed and growing slots, and the latent (lowrank_kv) union whose payload width differs per layer
RECIPES = ["streaming(sinks=2, window=6)", "h2o(heavy=0.25, recent=0.25)", "h2o(heavy=4, recent=4)", "snapkv(budget=8)",
           "lowrank_kv(keep=0.8) + h2o(heavy=0.25, recent=0.25)"]
PROMPT_IN_GRAPH = {"streaming(sinks=2, window=6)", "h2o(heavy=0.25, recent=0.25)", "h2o(heavy=4, recent=4)", "snapkv(budget=8)"}
# decode.onnx derived by decode_swap.py: H2O whose decode layers keep the plain h2o_decode function. Decode rows
# (decode_slots.ROWS, the default) make token-budget H2O's (recent_n >= 1) attention and eviction one function, not
# a swap of model.onnx's, so its decode graph is exported the traced way; fraction H2O keeps its partner: a swap.
SWAPPED = {"h2o(heavy=0.25, recent=0.25)"} | (set() if decode_slots.ROWS else {"h2o(heavy=4, recent=4)"})
STEPS = 40


def _onnx_run(cm, folder):
    meta = json.loads((folder / "graphwright.json").read_text())
    step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=5)
    return meta, decode_loop(SimpleNamespace(step_graph=cm.step_graph, _step=step), ids, mask, STEPS)


@pytest.fixture(scope="module", params=RECIPES)
def pair(request, onnx_artifact, tmp_path_factory):
    cm, stitched = onnx_artifact("tiny-llama", request.param)
    layered = tmp_path_factory.mktemp("layered") / "export"
    slot_functions.ENABLED = False
    try:
        gw.export_onnx(cm, layered)
    finally:
        slot_functions.ENABLED = True
    return cm, stitched, layered, request.param


def test_stitched_graphs_are_plain_onnx(pair):
    cm, stitched, layered, recipe = pair
    meta = json.loads((stitched / "graphwright.json").read_text())
    phases, old = meta["export"]["phases"], json.loads((layered / "graphwright.json").read_text())["export"]["phases"]
    # snapkv: decode.onnx is model.onnx's appends; h2o: model.onnx with its slot functions swapped (decode_swap.py)
    derived = meta["decode"]["derived_from"] is not None
    assert derived == (recipe.startswith("snapkv") or recipe in SWAPPED)
    assert ("decode_swap" in phases) == (recipe in SWAPPED) and ("decode_torch_export" in phases) == (not derived)
    assert ("decode_stitch" in phases) == (not derived) and "decode_stitch" not in old
    assert json.loads((layered / "graphwright.json").read_text())["decode"]["derived_from"] is None or recipe.startswith("snapkv")
    assert bool(meta["prompt"]["in_graph"]) == (recipe in PROMPT_IN_GRAPH)  # lowrank_kv + h2o: split at the prompt step
    assert ("stitch" in phases) == (recipe in PROMPT_IN_GRAPH) and "stitch" not in old
    for name in ("model.onnx", "decode.onnx"):
        m = onnx.load(str(stitched / name), load_external_data=False)
        assert not any(n.domain == slot_functions.DOMAIN for n in m.graph.node) and not m.functions
        assert slot_functions.DOMAIN not in {i.domain for i in m.opset_import}
        onnx.checker.check_model(str(stitched / name), full_check=True)
    assert meta["verification"]["passed"]
    assert "slot_functions" not in meta["export"]["notes"] and "decode_slot_functions" not in meta["export"]["notes"]


def test_stitched_equals_layer_by_layer(pair):
    cm, stitched, layered, _ = pair
    _, (got_logits, got_toks, got_state) = _onnx_run(cm, stitched)
    _, (want_logits, want_toks, want_state) = _onnx_run(cm, layered)
    assert torch.equal(got_toks, want_toks)
    assert (got_logits - want_logits).abs().max() <= 1e-5
    assert len(got_state) == len(want_state)
    for g, w in zip(got_state, want_state):
        assert g.shape == w.shape and (g.float() - w.float()).abs().max() <= 1e-5


def _ops_of(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", "") == slot_functions.LIBRARY]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.startswith("snapkv")])  # snapkv only appends at decode
@torch.inference_mode()
def test_wrap_one_op_per_layer_same_values(recipe):
    cm = gw.compile(_tiny("tiny-llama"), recipe=recipe, verify=False)
    sg = cm.step_graph
    gm, capacity, in_graph, _ = decode_graph(sg.gm, sg.state)
    wrapped = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    keys = slot_functions.wrap(wrapped)
    try:
        ops = _ops_of(wrapped)
        assert len(ops) >= len(in_graph) == sg.info.num_layers
        assert {n.args[1] for n in ops} == set(keys) and len(keys) < len(ops)  # equal constants share a key
        assert not any(getattr(n.target, "__name__", "") in slot_functions.OUTPUTS for n in wrapped.graph.nodes)
        if recipe.startswith("lowrank_kv"):  # the layers' latent payloads differ in width and still share one function
            widths = {s.shape[-1] for s in sg.state if s.kind == "kv"}
            assert len(widths) > 1
            assert {slot_functions.KEYS[k]["name"] for k in keys} == {"h2o_latent_decode"} and len(keys) == 1
        ids, mask = left_padded_batch(sg.info.vocab_size, [12, 7], seed=1)
        state = sg.init_state(2)
        pos = positions_from_mask(mask)
        _, *state = sg.gm(ids, pos, torch.arange(ids.shape[1]), *state)
        names, dims = [s.name for s in sg.state], [s.seq_dim for s in sg.state]
        state = pad_to_capacity(state, names, dims, capacity)
        step = (torch.tensor([[3], [4]]), pos[:, -1:] + 1, torch.zeros(1, dtype=torch.long), *state)
        for a, b in zip(gm(*step), wrapped(*step)):
            assert torch.equal(a, b)
    finally:
        for k in keys:
            slot_functions.KEYS.pop(k, None)


@pytest.mark.parametrize("recipe", sorted(PROMPT_IN_GRAPH))
@torch.inference_mode()
def test_wrap_prompt_step_same_values(recipe):
    """The prompt step's in-graph eviction (``prompt_slots``) wrapped: one op per layer, one key for equal
    constants, the same outputs eagerly as the unwrapped prompt graph (batch 2, left-padded, eviction crossed)."""
    cm = gw.compile(_tiny("tiny-llama"), recipe=recipe, verify=False)
    sg = cm.step_graph
    gm, record = prompt_graph(sg.gm, sg.state)
    assert len(record["in_graph"]) == sg.info.num_layers and not record["split"]
    wrapped = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    keys = slot_functions.wrap(wrapped)
    try:
        ops = _ops_of(wrapped)
        assert len(ops) == sg.info.num_layers and len(keys) == 1
        assert slot_functions.KEYS[keys[0]]["name"] == recipe.split("(")[0] + "_prompt"
        ids, mask = left_padded_batch(sg.info.vocab_size, [12, 7], seed=1)
        step = (ids, positions_from_mask(mask), torch.arange(ids.shape[1]), *sg.init_state(2))
        got, want = wrapped(*step), gm(*step)
        assert len(got) == len(want) == 1 + len(sg.state)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(a, b)
        assert any(o.shape[2] < ids.shape[1] for o, s in zip(want[1:], sg.state) if s.kind == "kv")  # it evicted
    finally:
        slot_functions.forget(keys)


@pytest.mark.parametrize("decode", [False, True])
@torch.inference_mode()
def test_wrap_streaming_shift_functions_same_values(decode):
    """StreamingLLM with keys cached at their positions (``streaming_shift.py``): the prompt graph's per-layer
    ``invert_slots`` (one output) is wrapped too, one key for all layers beside the eviction's; the decode graph's
    ``sink_keys`` and ``streaming_rows`` per layer and ``sink_rotation`` once; the wrapped graph computes
    the unwrapped one's values."""
    from graphwright.codegen.onnx.streaming_shift import shift_streaming

    cm = gw.compile(_tiny("tiny-llama"), recipe="streaming(sinks=2, window=6)", verify=False)
    sg = cm.step_graph
    shifted, layers = shift_streaming(sg.gm, decode=decode)
    assert layers == list(range(sg.info.num_layers))
    if decode:
        gm, capacity, _, _ = decode_graph(shifted, sg.state)
    else:
        gm, _ = prompt_graph(shifted, sg.state)
    wrapped = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    keys = slot_functions.wrap(wrapped)
    try:
        names = sorted(slot_functions.KEYS[k]["name"] for k in keys)
        if decode:  # decode_rows.SPLIT_ROWS: streaming_attend_slots per layer (attention + slot write), the step's
            # sink_rotation once for all layers (SHARED_ROWS: the slot indices are traced once, not wrapped)
            assert names == ["sink_rotation", "streaming_attend_slots"]
            assert len(_ops_of(wrapped)) == sg.info.num_layers + 1
        else:
            assert names == ["invert_slots", "streaming_prompt"]
            assert len(_ops_of(wrapped)) == 2 * sg.info.num_layers
        ids, mask = left_padded_batch(sg.info.vocab_size, [12, 7], seed=1)
        pos = positions_from_mask(mask)
        step = (ids, pos, torch.arange(ids.shape[1]), *sg.init_state(2))
        if decode:  # the prompt through the shifted prompt graph, then one decode step on its (padded) state
            prompt, _ = prompt_graph(shift_streaming(sg.gm, decode=False)[0], sg.state)
            _, *state = prompt(*step)
            state = pad_to_capacity(state, [s.name for s in sg.state], [s.seq_dim for s in sg.state], capacity)
            step = (torch.tensor([[3], [4]]), pos[:, -1:] + 1, torch.zeros(1, dtype=torch.long), *state)
        got, want = wrapped(*step), gm(*step)
        assert len(got) == len(want) == 1 + len(sg.state)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(a, b)
    finally:
        slot_functions.forget(keys)


def test_generalise_keeps_the_largest_size_of_a_differing_dim():
    """duo: one key shared by a layer with 1 streaming head and a layer with 2. The head dim becomes dynamic
    and the function's export example takes 2, whichever layer was traced first (``torch.export`` specialises
    a dynamic dim whose example is 1 and then refuses it as dynamic). A dynamic dim left below 2, or a dtype
    that differs, is a ``SlotSignatureError`` (the export then traces that graph layer by layer)."""
    f32, i64 = torch.float32, torch.int64
    one = [(f32, [2, 1, 5, 4], [0, 2]), (i64, [2, 1, 6], [0, 2])]
    two = [(f32, [2, 2, 5, 4], [0, 2]), (i64, [2, 2, 6], [0, 2])]
    got = slot_functions._generalise("k", one, two)
    assert got == [(f32, [2, 2, 5, 4], [0, 1, 2]), (i64, [2, 2, 6], [0, 1, 2])]
    assert slot_functions._generalise("k", two, one) == got
    args, dyn = slot_functions.export_example("k", got)
    assert [tuple(a.shape) for a in args] == [(2, 2, 5, 4), (2, 2, 6)] and [a.dtype for a in args] == [f32, i64]
    assert [sorted(d) for d in dyn] == [[0, 1, 2], [0, 1, 2]]
    assert slot_functions.export_example("k", [(f32, [2, 1, 5, 4], [0, 2])])[1] == ({0: torch.export.Dim.DYNAMIC,
                                                                                     2: torch.export.Dim.DYNAMIC},)
    with pytest.raises(slot_functions.SlotSignatureError, match=r"below 2 \(tensor, dim, size: \[\(0, 1, 1\)\]\)"):
        slot_functions.export_example("k", [(f32, [2, 1, 5, 4], [0, 1, 2])])
    with pytest.raises(slot_functions.SlotSignatureError, match="differ in dtype or rank"):
        slot_functions._generalise("k", one, [(torch.float16, [2, 2, 5, 4], [0, 2]), two[1]])


def test_a_stitching_failure_falls_back_layer_by_layer(monkeypatch, tmp_path):
    """Any failure of the stitched route (here every function's own export raises) exports that graph layer by
    layer instead: ``graphwright.json`` notes why for each graph, no key is left behind, and the artifact verifies
    and generates the torch runtime's tokens."""
    def broken(key, opset):
        raise ValueError(f"injected failure for {key}")

    monkeypatch.setattr(slot_functions, "function_proto", broken)
    cm = gw.compile(_tiny("tiny-llama"), recipe="streaming(sinks=2, window=6)", verify=False)
    before = set(slot_functions.KEYS)
    out = gw.export_onnx(cm, tmp_path / "export")
    meta = json.loads((out / "graphwright.json").read_text())
    notes, phases = meta["export"]["notes"], meta["export"]["phases"]
    # the first key of each graph failed: at the prompt step StreamingLLM's shift function or its eviction function
    # (streaming_shift.py); at decode the step's sink rotation, the sinks' keys or the slot write (decode_rows.py)
    for tag, fns in (("", "invert_slots|streaming_prompt"), ("decode_", "sink_rotation|sink_keys|streaming_rows")):
        assert notes[tag + "slot_functions"].startswith("layer by layer (GraphwrightError: ")
        assert re.search(rf"stitching the slot-eviction functions failed: ValueError: injected failure for ({fns})_\d+\)$",
                         notes[tag + "slot_functions"])
        assert tag + "stitch" in phases  # the stitched route ran first
    assert set(slot_functions.KEYS) == before
    assert meta["prompt"]["in_graph"] and meta["decode"]["model_file"] == "decode.onnx"
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    for name in ("model.onnx", "decode.onnx"):
        m = onnx.load(str(out / name), load_external_data=False)
        assert not any(n.domain == slot_functions.DOMAIN for n in m.graph.node) and not m.functions
        onnx.checker.check_model(str(out / name), full_check=True)
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=5)
    gen = dict(max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    assert torch.equal(gw.load(out).generate(ids, attention_mask=mask, **gen), cm.generate(ids, attention_mask=mask, **gen))


def test_a_failure_of_both_routes_is_raised(monkeypatch, tmp_path):
    """When the layer-by-layer route fails as well, its error is the export's error (nothing is swallowed)."""
    from graphwright.errors import GraphwrightError

    cm = gw.compile(_tiny("tiny-llama"), recipe="streaming(sinks=2, window=6)", verify=False)
    calls = []

    def broken(gm, *args, **kwargs):
        calls.append(any(n.op == "call_function" and getattr(n.target, "namespace", "") == slot_functions.LIBRARY
                         for n in gm.graph.nodes))
        raise RuntimeError("injected export failure")

    monkeypatch.setattr(torch.export, "export", broken)
    before = set(slot_functions.KEYS)
    with pytest.raises(GraphwrightError, match="torch.export of the step graph failed: RuntimeError: injected export failure"):
        gw.export_onnx(cm, tmp_path / "export", verify=False)
    assert calls == [True, False]  # the wrapped graph, then the same graph layer by layer
    assert set(slot_functions.KEYS) == before
