"""In-graph eviction at decode (``codegen/onnx/decode_slots.py``) and ORT I/O binding (``artifact.py``).

The registry's H2O and StreamingLLM artifacts (shared with ``test_registry_onnx.py`` through
``conftest.py``) are driven step by step through ``OnnxStep`` next to the torch backend (slot
eviction) and the torch backend with the compacting references: after the prefill and every one of
60 decode steps all three keep the same position set per (row, KV head) (batch 2, left-padded,
eviction at every step once the budget is reached), logits agree within 1e-4, and the ONNX state
shapes stop changing at the budget. Neither graph of these exports has split records (the prompt
step evicts in ``model.onnx``: ``prompt_slots.py``, ``test_onnx_prompt_slots.py``).
SnapKV's decode graph (an append) is checked on the graph rewrite alone (no export).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.codegen.onnx.decode_slots import decode_graph, pad_to_capacity, position_rank
from graphwright.compiled import CompiledModel
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, decode_loop, kept_sets

# the registry's settings (tests/passes/backend_cases.py), so the exports are shared
RECIPES = {"h2o": ("h2o(heavy=4, recent=4)", 8, "graphwright::evict_h2o"),
           "streaming": ("streaming(sinks=2, window=6)", 8, "graphwright::evict_streaming")}
LENGTHS = [12, 7]
STEPS = 60


@pytest.fixture(scope="module")
def runs(onnx_artifact):
    """case -> {"meta", "folder", backend: (logits, tokens, sets per step, state shapes per step)}."""
    out = {}
    for case, (recipe, _, _) in RECIPES.items():
        cm, folder = onnx_artifact("tiny-llama", recipe)
        meta = json.loads((folder / "graphwright.json").read_text())
        step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
        models = {"onnx": SimpleNamespace(step_graph=cm.step_graph, _step=step), "slots": cm,
                  "ref": CompiledModel(cm.step_graph, backend=COMPACTING)}
        ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, LENGTHS, seed=4)
        res = {"meta": meta, "folder": folder}
        for name, m in models.items():
            sets, shapes = [], []

            def on_step(i, state, m=m, sets=sets, shapes=shapes):
                sets.append(kept_sets(m, state))
                shapes.append([tuple(t.shape) for t in state])

            logits, toks, _ = decode_loop(m, ids, mask, STEPS, on_step)
            res[name] = (logits, toks, sets, shapes)
        out[case] = res
    return out


@pytest.mark.parametrize("case", list(RECIPES))
def test_in_graph_eviction_keeps_the_torch_sets(runs, case):
    _, budget, _ = RECIPES[case]
    r = runs[case]
    onnx, slots, ref = r["onnx"], r["slots"], r["ref"]
    assert torch.equal(onnx[1], slots[1]) and torch.equal(onnx[1], ref[1])
    assert onnx[2] == slots[2] == ref[2]
    # eviction at every step once the shorter row (7 tokens) is past the budget (8)
    assert all(len(h) == budget for step in onnx[2][2:] for layer in step for row in layer for h in row)
    assert (onnx[0] - slots[0]).abs().max() <= 1e-4
    assert (onnx[0] - ref[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("case", list(RECIPES))
def test_decode_state_shapes_stop_at_the_budget(runs, case):
    _, budget, _ = RECIPES[case]
    shapes = runs[case]["onnx"][3]
    assert all(s == shapes[1] for s in shapes[1:])
    meta = runs[case]["meta"]
    kv = [i for i, s in enumerate(meta["state"]) if s["kind"] == "kv"]
    assert all(shapes[-1][i][2] == budget for i in kv)


@pytest.mark.parametrize("case", list(RECIPES))
def test_decode_graph_has_no_split(runs, case):
    _, budget, op = RECIPES[case]
    meta = runs[case]["meta"]
    assert meta["decode"]["runtime_ops"] == [] and meta["decode"]["split"] == []
    assert meta["decode"]["in_graph"] == [op, op]
    assert meta["runtime_ops"] == []  # the prefill evicts in the graph too (prompt_slots.py)
    assert {c["slots"] for c in meta["decode"]["capacity"].values()} == {budget}
    assert meta["decode"]["outputs"] == ["logits", *(f"{s['name']}_next" for s in meta["state"])]  # no cut outputs
    assert meta["decode"]["shares_weights"] and not (runs[case]["folder"] / "decode.onnx.data").exists()
    assert meta["export"]["notes"]["decode_decompositions"] == "skipped"  # exporter_shortcuts.py: no retrace of the decode graph
    assert "decode_share_weights" not in meta["export"]["phases"]  # saved pointing into model.onnx.data: never written twice


def test_io_binding_gives_the_same_tokens(runs, monkeypatch):
    folder = runs["h2o"]["folder"]
    ids, mask = left_padded_batch(256, [9, 5], seed=2)
    plain = gw.load(folder, io_binding=False)
    want = plain.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], pad_token_id=0)
    bound = gw.load(folder)
    calls = []
    run = OnnxStep._run_bound
    monkeypatch.setattr(OnnxStep, "_run_bound", lambda self, *a: calls.append(1) or run(self, *a))
    got = bound.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, want)
    assert len(calls) == 20  # every step bound, the prefill too (it has no runtime ops: prompt_slots.py)
    assert torch.equal(bound.logits(ids, mask), plain.logits(ids, mask))


@pytest.mark.parametrize("recipe, in_graph, reason", [
    ("snapkv(budget=6, window=2)", ["graphwright::evict_snapkv"] * 2, None),  # appends at decode
])
def test_policies_left_split_at_decode(recipe, in_graph, reason):
    cm = gw.compile(gw.load_model("tiny-llama")[0], recipe=recipe, verify=False)
    gm, capacity, got, left = decode_graph(cm.step_graph.gm, cm.step_graph.state)
    assert got == in_graph and capacity == {}
    assert [x["reason"] for x in left] == ([reason] * 2 if reason else []) and [x["layer"] for x in left] == ([0, 1] if reason else [])
    if in_graph:  # SnapKV's decode graph gives the step graph's logits
        ids, mask = left_padded_batch(256, LENGTHS, seed=4)
        ref = SimpleNamespace(step_graph=cm.step_graph, _step=lambda *a: _call(cm.step_graph.gm, *a))
        got_logits, got_toks, _ = decode_loop(_Split(cm.step_graph.gm, gm, cm), ids, mask, 5)
        want, want_toks, _ = decode_loop(ref, ids, mask, 5)
        assert torch.equal(got_toks, want_toks) and torch.equal(got_logits, want)


def _call(gm, ids, pos, li, state):
    logits, *state = gm(ids, pos, li, *state)
    return logits, state


class _Split:
    """Prefill on the step graph, T = 1 steps on the decode graph (what OnnxStep does with two sessions)."""

    def __init__(self, prefill, decode, cm):
        self.step_graph = cm.step_graph
        self.prefill, self.decode = prefill, decode

    def _step(self, ids, pos, li, state):
        return _call(self.decode if ids.shape[1] == 1 else self.prefill, ids, pos, li, state)


def test_position_rank_is_the_rank_among_valid_slots():
    g = torch.Generator().manual_seed(0)
    k_pos = torch.stack([torch.randperm(20, generator=g)[:9] for _ in range(6)]).view(2, 3, 9)
    k_pos = k_pos.masked_fill(torch.rand(2, 3, 9, generator=g) < 0.3, -1)
    rank = position_rank(k_pos)
    for b in range(2):
        for h in range(3):
            valid = sorted(int(p) for p in k_pos[b, h] if p >= 0)
            for s in range(9):
                if k_pos[b, h, s] >= 0:
                    assert rank[b, h, s] == valid.index(int(k_pos[b, h, s]))
                else:
                    assert rank[b, h, s] == len(valid)


def test_pad_to_capacity_fills_empty_slots():
    k, kp = torch.ones(2, 2, 3, 4), torch.arange(3).expand(2, 2, 3)
    cap = {"k": {"slots": 5, "fill": 0}, "kp": {"slots": 5, "fill": -1}}
    pk, pkp, other = pad_to_capacity([k, kp, kp], ["k", "kp", "x"], [2, 2, 2], cap)
    assert pk.shape == (2, 2, 5, 4) and pk[:, :, 3:].abs().sum() == 0 and torch.equal(pk[:, :, :3], k)
    assert pkp[0, 0].tolist() == [0, 1, 2, -1, -1] and other is kp
