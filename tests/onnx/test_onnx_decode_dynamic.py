"""In-graph decode eviction with growing slot capacities: fraction budgets and latent caches.

``codegen/onnx/decode_slots.py`` (fraction budgets computed in the graph, ``grow`` capacities) and
``codegen/onnx/decode_latent.py`` (latent layers: union of the heads' sets on shared slots). The
exports run step by step through ``OnnxStep`` next to the torch backend with the compacting
references: after the prefill and each of 60 decode steps (tiny Llama, batch 2 left-padded, eviction
at every step once past the prompt) the same position set per (row, KV head), same tokens, logits
within 1e-4; slot widths grow only in ``GROW_SLACK`` steps and stay within one step of the largest
kept set; I/O binding gives ``session.run``'s tokens. Latent StreamingLLM and token-count H2O are
checked on the decode graph run eagerly (no export); the position-ordered top-k is checked against
``eviction_ref.topk_mask`` with tied scores, eagerly and as an ONNX TopK.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.codegen.onnx.decode_latent import fastgen_decode, topk_by_position
from graphwright.codegen.onnx.decode_slots import GROW_SLACK, decode_graph, pad_to_capacity
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction_ref import topk_mask
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, floor_budget, record_decode, state_of

RECIPES = {"fraction": "h2o(heavy=0.25, recent=0.25)", "latent": "lowrank_kv(keep=0.5) + h2o(heavy=0.25, recent=0.25)"}
LENGTHS = [12, 7]
STEPS = 60
KP = ["key_positions0", "key_positions1"]


def _widths(m, state):
    return [state_of(m, state, kp).shape[2] for kp in KP]


def _run(m):
    """(logits, tokens, kept sets per step, key_positions widths per step)."""
    return record_decode(m, LENGTHS, STEPS, KP, _widths)


@pytest.fixture(scope="module")
def runs(onnx_artifact):
    out = {}
    for case, recipe in RECIPES.items():
        cm, folder = onnx_artifact("tiny-llama", recipe)
        meta = json.loads((folder / "graphwright.json").read_text())
        step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
        out[case] = {"meta": meta, "folder": folder, "onnx": _run(SimpleNamespace(step_graph=cm.step_graph, _step=step)),
                     "ref": _run(CompiledModel(cm.step_graph, backend=COMPACTING)), "slots": _run(cm)}
    return out


@pytest.mark.parametrize("case", list(RECIPES))
def test_in_graph_decode_keeps_the_reference_sets(runs, case):
    r = runs[case]
    onnx, ref, slots = r["onnx"], r["ref"], r["slots"]
    assert torch.equal(onnx[1], ref[1]) and torch.equal(onnx[1], slots[1])
    assert onnx[2] == ref[2] == slots[2]
    assert (onnx[0] - ref[0]).abs().max() <= 1e-4
    final = [len(h) for layer in onnx[2][-1] for row in layer for h in row]
    lengths = [n + STEPS for n in LENGTHS]
    if case == "fraction":  # each head holds its budget floor(L/4) heavy + floor(L/4) recent, reached one token per step
        want = []
        for n in LENGTHS:
            kept = 2 * floor_budget(0.25, n)
            for L in range(n + 1, n + STEPS + 1):
                kept = min(kept + 1, 2 * floor_budget(0.25, L))
            want.append(kept)
        assert final == [want[b] for _ in range(2) for b in range(2) for _ in range(2)]
    else:  # the union of the heads' sets: evicting, and the same set for every head of a row
        assert all(n < max(lengths) for n in final)
        assert all(row[0] == row[1] for step in onnx[2] for layer in step for row in layer)


@pytest.mark.parametrize("case", list(RECIPES))
def test_slot_widths_grow_in_steps(runs, case):
    _, _, sets, widths = runs[case]["onnx"]
    most = [0, 0]  # the largest kept set so far per layer (widths never shrink; a latent union can)
    for step in range(1, STEPS + 1):
        for layer in range(2):
            w, kept = widths[step][layer], max(len(h) for row in sets[step][layer] for h in row)
            most[layer] = max(most[layer], kept)
            assert (w % GROW_SLACK == 0 or w == widths[0][layer]) and kept <= w <= most[layer] + 1 + GROW_SLACK
    for layer in range(2):  # each layer's width changes only when it grows by GROW_SLACK steps
        seen = [w[layer] for w in widths[1:]]
        assert len(set(seen)) <= 1 + max(seen) // GROW_SLACK and seen == sorted(seen)


@pytest.mark.parametrize("case", list(RECIPES))
def test_decode_metadata(runs, case):
    meta = runs[case]["meta"]
    assert meta["decode"]["split"] == [] and meta["decode"]["runtime_ops"] == []
    assert meta["decode"]["in_graph"] == ["graphwright::evict_h2o"] * 2
    cap = meta["decode"]["capacity"]
    layer_states = [s["name"] for s in meta["state"] if s["layer"] is not None]
    assert sorted(cap) == sorted(layer_states)
    assert {c["grow"] for c in cap.values()} == set(KP)
    assert all(c["fill"] == (-1 if name in KP else 0) for name, c in cap.items())


def test_io_binding_gives_the_same_tokens(runs):
    folder = runs["latent"]["folder"]
    ids, mask = left_padded_batch(256, [9, 5], seed=2)
    want = gw.load(folder, io_binding=False).generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], pad_token_id=0)
    got = gw.load(folder).generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, want)


class _Eager:
    """Prefill on the step graph, T = 1 steps on the decode graph with the runtime's padding (what OnnxStep does)."""

    def __init__(self, cm):
        self.step_graph = sg = cm.step_graph
        self.gm, self.capacity, self.in_graph, self.left = decode_graph(sg.gm, sg.state)
        self.names, self.dims = [s.name for s in sg.state], [s.seq_dim for s in sg.state]

    def _step(self, ids, pos, li, state):
        if ids.shape[1] == 1:
            state = pad_to_capacity(list(state), self.names, self.dims, self.capacity)
        logits, *state = (self.gm if ids.shape[1] == 1 else self.step_graph.gm)(ids, pos, li, *state)
        return logits, state


@pytest.mark.parametrize("recipe, slots, most", [("lowrank_kv(keep=0.5) + streaming(sinks=2, window=6)", 8, 8),
                                                 ("lowrank_kv(keep=0.5) + h2o(heavy=4, recent=4)", None, 2 * 4 + 4)])
def test_latent_decode_graph_keeps_the_reference_sets(recipe, slots, most):
    cm = gw.compile(gw.load_model("tiny-llama")[0], recipe=recipe, verify=False)
    eager = _Eager(cm)
    assert len(eager.in_graph) == 2 and eager.left == []
    assert {c["slots"] for c in eager.capacity.values()} == {slots or 1}
    assert all(("grow" in c) == (slots is None) for c in eager.capacity.values())
    got, want = _run(eager), _run(CompiledModel(cm.step_graph, backend=COMPACTING))
    assert got[2] == want[2] and torch.equal(got[1], want[1])
    assert (got[0] - want[0]).abs().max() <= 1e-4
    assert all(len(h) <= most for step in got[2] for layer in step for row in layer for h in row)  # sinks + window; Hk heavy sets + recent
    if slots:  # a fixed capacity: the width never changes after the prefill's padding
        assert {tuple(w) for w in got[3][1:]} == {(slots, slots)}


def _tied_case():
    """Scores with ties on shuffled slots, and the same in position order (what the reference sees)."""
    g = torch.Generator().manual_seed(3)
    B, Hk, S = 2, 3, 12
    score = torch.randint(0, 4, (B, Hk, S), generator=g).float() / 4  # many equal values
    k_pos = torch.arange(S).expand(B, Hk, S).clone()
    k_pos[:, :, -2:] = -1
    cand = (k_pos >= 0) & (torch.rand(B, Hk, S, generator=g) < 0.8)
    k = torch.tensor([3, 5])
    perm = torch.randperm(S, generator=g)
    return (score[..., perm], cand[..., perm], k_pos[..., perm], k), topk_mask(score, cand, k)[..., perm]


def test_topk_by_position_breaks_ties_by_position():
    args, want = _tied_case()
    assert torch.equal(topk_by_position(*args), want)


def test_topk_by_position_as_onnx_topk(tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class M(torch.nn.Module):
        def forward(self, score, cand, k_pos, k):
            return topk_by_position(score, cand, k_pos, k)

    args, want = _tied_case()
    path = tmp_path / "topk.onnx"
    torch.onnx.export(M(), args, str(path), dynamo=True, input_names=["score", "cand", "k_pos", "k"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(["score", "cand", "k_pos", "k"], args)})[0]
    assert torch.equal(torch.from_numpy(got), want)


def test_fastgen_decode_op_every_policy_matches_reference():
    """Op level (``tests/passes/test_eviction_slots.py``'s driver): one head per ladder policy, random
    classes, fraction and zero budgets; the runtime's growing padding between steps; 40 steps."""
    from graphwright.ops.fastgen_ref import fastgen_reference
    from tests.passes.test_eviction_slots import POLICIES, fastgen_op_run

    names = ["k", "v", "kp", "score", "cls"]
    cap = {n: {"slots": 1, "fill": -1 if n == "kp" else 0, "grow": "kp"} for n in names}

    def decode(q, k, v, q_pos, k_pos, score, cls, new, pol, *rest):
        fn = fastgen_reference if pol.shape[-1] == 0 else fastgen_decode
        out = fn(q, k, v, q_pos, k_pos, score, cls, new, pol, *rest)
        return (*pad_to_capacity(list(out[:5]), names, [2] * 5, cap), out[5])

    def classes(i, T):
        return torch.randint(0, 3, (2, T), generator=torch.Generator().manual_seed(100 + i)).to(torch.int8)

    for frequent, local in (((1, 0.1), (0, 0.2)), ((3, 0.0), (2, 0.0))):
        got, _ = fastgen_op_run(decode, 40, POLICIES, classes, frequent, local)
        want, _ = fastgen_op_run(fastgen_reference, 40, POLICIES, classes, frequent, local)
        assert got == want
        assert got[-1][1][1] == list(range(52)) and len(got[-1][0][0]) < 30  # the full head keeps all; the special one evicts


def test_fastgen_in_graph_keeps_the_reference_sets(onnx_artifact):
    """FastGen's decode graph (profiled policies, several tokens may leave per step) against the references."""
    cm, folder = onnx_artifact("tiny-llama", "fastgen(recovery=0.9)")
    meta = json.loads((folder / "graphwright.json").read_text())
    assert meta["decode"]["in_graph"] == ["graphwright::evict_fastgen"] * 2 and meta["decode"]["split"] == []
    assert meta["decode"]["capacity"]["fastgen_policy0"] == {"slots": 1, "fill": 0}
    step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
    got = _run(SimpleNamespace(step_graph=cm.step_graph, _step=step))
    want = _run(CompiledModel(cm.step_graph, backend=COMPACTING))
    assert got[2] == want[2] and torch.equal(got[1], want[1])
    assert (got[0] - want[0]).abs().max() <= 1e-4
