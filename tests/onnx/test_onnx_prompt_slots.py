"""In-graph eviction at the ONNX prompt step (``codegen/onnx/prompt_slots.py``).

The ops: StreamingLLM (sinks + window, and the native sliding layers' sinks=0 form), H2O (token
counts and fractions) and SnapKV (avg and max pooling), written with exportable tensor ops, keep the
compacting references' position set per (row, KV head) with the same k/v/score rows, at a first
prompt step (batch 2, left-padded) and at a later multi-token step after a compacted cache. The
artifacts: a prompt step of each is one session run (no runtime op, no ``split.run_records``) that
keeps the torch reference's sets and state widths with logits within 1e-4; ``graphwright.json``
records which steps are one session run and which stay split with the reason; the split remains for
FastGen, latent caches and SnapKV + ThinK.
"""

from __future__ import annotations

import json

import pytest
import torch

import graphwright as gw
from graphwright.capture.step_graph import positions_from_mask
from graphwright.codegen.onnx import split as split_module
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.codegen.onnx.prompt_slots import (
    FASTGEN_REASON,
    LATENT_REASON,
    VIEW_REASON,
    h2o_prompt,
    prompt_graph,
    snapkv_prompt,
    streaming_prompt,
)
from graphwright.codegen.onnx.split import split
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction_ref import h2o_reference, snapkv_reference, streaming_reference
from tests.conftest import left_padded_batch
from tests.passes.backend_cases import backend_cases
from tests.passes.eviction_helpers import COMPACTING, kept_positions, state_of

# case: (recipe, constant slot bound or None for a data-dependent width, op); shared with test_onnx_eviction_slots.py
# and the registry suite (tests/passes/backend_cases.py)
RECIPES = {"h2o": ("h2o(heavy=4, recent=4)", 8, "graphwright::evict_h2o"),
           "streaming": ("streaming(sinks=2, window=6)", 8, "graphwright::evict_streaming"),
           "h2o_fraction": ("h2o(heavy=0.25, recent=0.25)", None, "graphwright::evict_h2o"),
           "snapkv": ("snapkv(budget=6, window=2)", None, "graphwright::evict_snapkv")}


def _batch(lengths, B=2, H=4, Hk=2, D=8, seed=0, start=None):
    """Random q/k/v of a left-padded step: row b has lengths[b] real tokens at positions start[b].."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    q_pos = torch.full((B, T), -1)
    for b, n in enumerate(lengths):
        q_pos[b, T - n:] = torch.arange(n) + (start[b] if start else 0)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hk, Hk))
    return q, k, v, q_pos


def _rows(out_k_pos, tensors):
    """{(row, head, position): (tensor rows at that slot)} of a compacted result."""
    rows = {}
    for b, heads in enumerate(out_k_pos.tolist()):
        for h, slots in enumerate(heads):
            for s, p in enumerate(slots):
                if p >= 0:
                    rows[(b, h, p)] = [t[b, h, s] for t in tensors]
    return rows


def _same(got, want, k_pos_index):
    """Same kept positions per (row, head) and the same tensor rows at each kept position."""
    assert [[sorted(h) for h in r] for r in kept_positions(got[k_pos_index])] == \
           [[sorted(h) for h in r] for r in kept_positions(want[k_pos_index])]
    g = _rows(got[k_pos_index], [t for i, t in enumerate(got) if i != k_pos_index])
    w = _rows(want[k_pos_index], [t for i, t in enumerate(want) if i != k_pos_index])
    assert g.keys() == w.keys() and g
    for key in g:
        assert all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(g[key], w[key])), key


H2O_SETTINGS = [(4, 0.0, 4, 0.0), (2, 0.0, 3, 0.0), (10, 0.0, 10, 0.0), (0, 0.0, 5, 0.0), (0, 0.25, 0, 0.25), (2, 0.1, 1, 0.3)]
STREAMING_SETTINGS = [(2, 6), (0, 7), (0, 20), (4, 0)]
SNAPKV_SETTINGS = [(6, 2, 5, "avg"), (6, 2, 5, "max"), (8, 4, 1, "avg"), (4, 4, 3, "max"), (20, 4, 3, "avg")]


@pytest.mark.parametrize("lengths", [[12, 7], [5, 5]])
def test_prompt_ops_match_the_references_at_a_first_prompt_step(lengths):
    q, k, v, q_pos = _batch(lengths)
    k_pos = q_pos[:, None, :].expand(2, 2, -1).contiguous()
    score = torch.zeros(2, 2, 0)
    for budgets in H2O_SETTINGS:
        args = (q, k, v, q_pos, k_pos, score, 0.3, *budgets)
        got, want = h2o_prompt(*args), h2o_reference(*args)
        _same(got, want, 2)
        assert got[2].shape == want[2].shape  # first prompt step: the reference's width
    for setting in SNAPKV_SETTINGS:
        got, want = snapkv_prompt(q, k, v, q_pos, k_pos, 0.3, *setting), snapkv_reference(q, k, v, q_pos, k_pos, 0.3, *setting)
        _same(got, want, 2)
        assert got[2].shape == want[2].shape
    for sinks, window in STREAMING_SETTINGS:
        got, want = streaming_prompt(k, v, q_pos, k_pos, sinks, window), streaming_reference(k, v, q_pos, k_pos, sinks, window)
        _same(got, want, 2)
        assert got[2].shape == want[2].shape


def test_prompt_ops_match_the_references_after_a_compacted_cache():
    """A multi-token step (T = 5) on a cache the reference compacted (per-head sets, empty slots)."""
    q, k, v, q_pos = _batch([12, 7], seed=1)
    k_pos = q_pos[:, None, :].expand(2, 2, -1).contiguous()
    q2, k2, v2, q_pos2 = _batch([5, 5], seed=2, start=[12, 7])
    for heavy, heavy_f, recent, recent_f in H2O_SETTINGS:
        ck, cv, ckp, cs = h2o_reference(q, k, v, q_pos, k_pos, torch.zeros(2, 2, 0), 0.3, heavy, heavy_f, recent, recent_f)
        kp = torch.cat([ckp, q_pos2[:, None].expand(2, 2, -1)], 2)
        args = (q2, torch.cat([ck, k2], 2), torch.cat([cv, v2], 2), q_pos2, kp, cs, 0.3, heavy, heavy_f, recent, recent_f)
        got, want = h2o_prompt(*args), h2o_reference(*args)
        _same(got, want, 2)
        assert got[2].shape[2] == (min(kp.shape[2], heavy + recent) if not heavy_f else want[2].shape[2])
    for setting in SNAPKV_SETTINGS:  # a later prompt step appends: every valid slot kept
        ck, cv, ckp = snapkv_reference(q, k, v, q_pos, k_pos, 0.3, *setting)
        kp = torch.cat([ckp, q_pos2[:, None].expand(2, 2, -1)], 2)
        args = (q2, torch.cat([ck, k2], 2), torch.cat([cv, v2], 2), q_pos2, kp, 0.3, *setting)
        got = snapkv_prompt(*args)
        _same(got, snapkv_reference(*args), 2)
        assert kept_positions(got[2]) == [[sorted(p for p in h if p >= 0) for h in r] for r in kp.tolist()]
    for sinks, window in STREAMING_SETTINGS:
        ck, cv, ckp = streaming_reference(k, v, q_pos, k_pos, sinks, window)
        kp = torch.cat([ckp, q_pos2[:, None].expand(2, 2, -1)], 2)
        args = (torch.cat([ck, k2], 2), torch.cat([cv, v2], 2), q_pos2, kp, sinks, window)
        got = streaming_prompt(*args)
        _same(got, streaming_reference(*args), 2)
        assert got[2].shape[2] == min(kp.shape[2], sinks + window)


@pytest.fixture(scope="module")
def artifacts(onnx_artifact):
    return {case: onnx_artifact("tiny-llama", recipe) for case, (recipe, _, _) in RECIPES.items()}


@pytest.mark.parametrize("case", list(RECIPES))
@pytest.mark.parametrize("lengths", [[12, 7], [5, 3]])
def test_prompt_step_is_one_session_run_with_the_reference_cache(artifacts, case, lengths, monkeypatch):
    _, bound, op = RECIPES[case]
    cm, folder = artifacts[case]
    meta = json.loads((folder / "graphwright.json").read_text())
    assert meta["runtime_ops"] == [] and meta["outputs"] == ["logits", *(f"{s['name']}_next" for s in meta["state"])]
    runs = meta["session_runs"]
    assert runs["prompt"] == {"one_session_run": True, "in_graph": [{"op": op, "layer": 0}, {"op": op, "layer": 1}], "split": []}
    assert runs["decode"]["one_session_run"] and runs["decode"]["split"] == []
    assert set(meta["prompt"]["capacity"].values()) == {bound}
    step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
    monkeypatch.setattr(split_module, "run_records", lambda *a: pytest.fail("a prompt step ran a runtime op"))
    calls = []
    run = OnnxStep._run_bound
    monkeypatch.setattr(OnnxStep, "_run_bound", lambda self, *a: calls.append(1) or run(self, *a))
    ref = CompiledModel(cm.step_graph, backend=COMPACTING)
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, lengths, seed=4)
    pos, li = positions_from_mask(mask), torch.arange(ids.shape[1])
    lo, so = step(ids, pos, li, cm.step_graph.init_state(2))
    lt, st = ref._step(ids, pos, li, ref.runtime_graph.init_state(2))
    assert calls == [1]  # one session run, outputs bound to the state tensors
    assert (lo - lt)[mask.bool()].abs().max() <= 1e-4
    assert [tuple(t.shape) for t in so] == [tuple(t.shape) for t in st]  # the reference's widths: the same kv bytes
    for layer in range(2):
        name = f"key_positions{layer}"
        got, want = kept_positions(state_of(cm, so, name)), kept_positions(state_of(ref, st, name))
        assert [[sorted(h) for h in r] for r in got] == [[sorted(h) for h in r] for r in want]
        if bound:
            assert all(len(h) == min(n, bound) for r, n in zip(got, lengths) for h in r)
    kept = sum(len(h) for layer in range(2) for r in kept_positions(state_of(cm, so, f"key_positions{layer}")) for h in r)
    if max(lengths) > 8:  # past every budget here: the prompt step evicted
        assert kept < 2 * cm.step_graph.info.num_kv_heads * sum(lengths)


FASTGEN = backend_cases()["fastgen"]


@pytest.mark.parametrize("model, recipe, reasons", [
    (*backend_cases()["snapkv+think"], [VIEW_REASON]),
    (*FASTGEN, [FASTGEN_REASON]),
    ("tiny-llama", "lowrank_kv(keep=0.5) + streaming(sinks=2, window=6)", [LATENT_REASON]),
    ("tiny-llama", "h2o(heavy=4, recent=4, layers=[1]) + streaming(sinks=2, window=6, layers=[0])", []),
])
def test_policies_left_split_at_the_prompt_step(model, recipe, reasons):
    """The ops without a prompt translation stay in the graph for ``split`` to cut, with their reason."""
    cm = gw.compile(gw.load_model(model)[0], recipe=recipe, verify=False)
    sg = cm.step_graph
    gm, record = prompt_graph(sg.gm, sg.state)
    layers = sorted({s.layer for s in sg.state if s.kind == "positions" and s.layer is not None})
    assert sorted({x["reason"] for x in record["split"]}) == reasons
    assert [x["layer"] for x in record["split"]] == (layers if reasons else [])
    assert [x["layer"] for x in record["in_graph"]] == ([] if reasons else [0, 1])
    inputs = ["input_ids", "positions", "logits_index", *(s.name for s in sg.state), *(x.name for x in sg.extra_inputs)]
    _, records, _ = split(gm, inputs, [s.name for s in sg.state])
    cut = [r for r in records if r["op"].startswith("graphwright::evict")]
    assert [(r["op"], r["layer"]) for r in cut] == [(x["op"], x["layer"]) for x in record["split"]]


def test_split_prompt_step_is_recorded_in_the_artifact(onnx_artifact):
    """FastGen: decode in the graph, the prompt step split (runtime ops), each with its record."""
    cm, folder = onnx_artifact(*FASTGEN)
    meta = json.loads((folder / "graphwright.json").read_text())
    runs = meta["session_runs"]
    assert runs["prompt"]["one_session_run"] is False and runs["prompt"]["in_graph"] == []
    assert [(x["layer"], x["reason"]) for x in runs["prompt"]["split"]] == [(0, FASTGEN_REASON), (1, FASTGEN_REASON)]
    assert [r["op"] for r in meta["runtime_ops"]] == ["graphwright::evict_fastgen"] * 2
    assert runs["decode"] == {"one_session_run": True, "in_graph": ["graphwright::evict_fastgen"] * 2, "split": []}
    assert meta["verification"]["passed"] and meta["prompt"]["capacity"] == {}


@pytest.mark.parametrize("capacity, match", [({"nope": 8}, r"prompt.capacity\['nope'\]: one of"),
                                             ({"k0": 0}, r"prompt.capacity\['k0'\]: an integer in \[1, "),
                                             ({"k0": "8"}, r"prompt.capacity\['k0'\]: an integer")])
def test_prompt_capacity_is_checked_on_load(artifacts, tmp_path, capacity, match):
    """``prompt.capacity`` sizes the bound outputs of a prompt step: a bad entry is refused when loading."""
    import shutil

    from graphwright.errors import GraphwrightError

    folder = tmp_path / "art"
    shutil.copytree(artifacts["h2o"][1], folder)
    meta = json.loads((folder / "graphwright.json").read_text())
    meta["prompt"]["capacity"] = capacity
    (folder / "graphwright.json").write_text(json.dumps(meta))
    with pytest.raises(GraphwrightError, match=match):
        gw.load(folder)
