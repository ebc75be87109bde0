"""In-graph ONNX decode of the scored policies (``codegen/onnx/decode_policies.py``, issue 20 / issue 17 item 2).

``evict(score=h2o|knorm|keydiff|tova, when="decode")``, Scissorhands and Keyformer (``noise="none"``, and
``"gumbel"`` with its noise the ``keyformer_noise<l>`` inputs ``OnnxStep`` draws) are
exported on tiny Llama and driven step by step through ``OnnxStep`` (prefill: ``model.onnx`` with the op
split; decode: ``decode.onnx`` with the op in the graph) next to the torch backend (slots,
``codegen/torch/policy_slots.py``) and the torch backend with the compacting references: batch 2
left-padded, eviction at every step, 48 decode steps; after every step the three keep the same position
set per (row, layer, KV head), the same tokens, logits within 1e-4. ``graphwright.json`` has no decode
split record and no decode runtime op for these ops; token-count budgets keep the decode state's shapes
constant (the capacity), a fraction budget grows the slots in ``GROW_SLACK`` steps. The settings left
split at decode carry their reason. Op level (no export): each decode function on the state padded as
``OnnxStep`` pads it keeps the reference's sets over 120 steps of random attention, a 1-token prompt
(a cache that starts at a decode step) included; Scissorhands' ring bits and counts per token are the
reference's.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx import slot_functions
from graphwright.codegen.onnx.artifact import OnnxStep
from graphwright.codegen.onnx.decode_policies import keyformer_decode, keyformer_noise, scissorhands_decode, scored_acc_decode, scored_decode
from graphwright.codegen.onnx.decode_slots import GROW_SLACK, decode_graph, pad_to_capacity
from graphwright.compiled import CompiledModel
from graphwright.ops.policy_keyformer import keyformer_reference
from graphwright.ops.policy_scissorhands import ring_bytes, scissorhands_reference
from graphwright.ops.policy_scored import scored_reference
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, kept_positions, op_decode_loop, record_decode

SCORED, SCORED_ACC = "graphwright::evict_scored", "graphwright::evict_scored_acc"
# case -> (recipe, tokens each KV head holds after every step (None: a fraction budget), op)
CASES = {
    "h2o": ("evict(score='h2o', when='decode', budget=7, window=2)", 7, SCORED_ACC),
    # knorm: the same token at two positions has two equal key norms apart by rounding, which differs between ORT
    # and torch; the near-tie rule (ops/scorers/near_ties.py) makes them tie on both (without it: tokens differ at step 39)
    "knorm": ("evict(score='knorm', when='decode', budget=7, window=2, sinks=1)", 7, SCORED),
    "keydiff": ("evict(score='keydiff', when='decode', budget=6, window=1)", 6, SCORED),
    "tova": ("evict(score='tova', when='decode', budget=6)", 6, SCORED),
    "scissorhands": ("scissorhands(budget=8, history=12, recent=2, sinks=1)", 7, "graphwright::evict_scissorhands"),
    "keyformer": ("keyformer(kv=8, recent=0.25, noise='none')", 7, "graphwright::evict_keyformer"),
    # Gumbel noise (the default): drawn by OnnxStep from the torch backend's seeded stream, fed as keyformer_noise<l>
    "keyformer_gumbel": ("keyformer(kv=8, recent=0.25, seed=3)", 7, "graphwright::evict_keyformer"),
    "fraction": ("evict(score='h2o', when='decode', budget=0.3, window=0.1)", None, SCORED_ACC),
}
LENGTHS = [14, 9]
STEPS = 48
KP = ["key_positions0", "key_positions1"]


def _shapes(m, state):
    return {s.name: tuple(t.shape) for s, t in zip(m.step_graph.state, state)}


def _run(m):
    """(logits, tokens, kept sets per step [layer][row][head], state shapes per step)."""
    return record_decode(m, LENGTHS, STEPS, KP, _shapes)


@pytest.fixture(scope="module")
def runs(onnx_artifact):
    """runs(case) -> {"meta", "onnx", "slots", "ref"}: each case exported and decoded once per module."""
    done = {}

    def get(case):
        if case not in done:
            cm, folder = onnx_artifact("tiny-llama", CASES[case][0])
            meta = json.loads((folder / "graphwright.json").read_text())
            step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
            done[case] = {"meta": meta, "folder": folder, "onnx": _run(SimpleNamespace(step_graph=cm.step_graph, _step=step)),
                          "slots": _run(cm), "ref": _run(CompiledModel(cm.step_graph, backend=COMPACTING))}
        return done[case]

    return get


SLOW = {"keydiff", "fraction"}  # each export of tiny Llama takes 10-20 s: the rest covers every function


def _cases():
    return [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]


@pytest.mark.parametrize("case", _cases())
def test_decode_graph_keeps_the_torch_sets_at_every_step(runs, case):
    _, kept, _ = CASES[case]
    r = runs(case)
    onnx, slots, ref = r["onnx"], r["slots"], r["ref"]
    assert torch.equal(onnx[1], slots[1]) and torch.equal(onnx[1], ref[1])
    assert onnx[2] == slots[2] == ref[2]
    assert (onnx[0] - slots[0]).abs().max() <= 1e-4 and (onnx[0] - ref[0]).abs().max() <= 1e-4
    lengths = [n + STEPS for n in LENGTHS]
    if kept is not None:  # both rows are past the budget at the prompt: one token leaves at every step
        assert all(len(h) == kept for step in onnx[2] for layer in step for row in layer for h in row)
    else:  # floor(0.3 L) + floor(0.1 L) tokens, evicting (far below the row's length)
        assert all(0 < len(h) < 0.5 * lengths[b] for layer in onnx[2][-1] for b, row in enumerate(layer) for h in row)


@pytest.mark.parametrize("case", _cases())
def test_decode_runs_in_one_session_with_nothing_split(runs, case):
    _, kept, op = CASES[case]
    meta = runs(case)["meta"]
    d = meta["decode"]
    assert d["model_file"] == "decode.onnx" and d["runtime_ops"] == [] and d["split"] == []
    assert d["in_graph"] == [op, op]
    assert d["outputs"] == ["logits", *(f"{s['name']}_next" for s in meta["state"])]  # no cut outputs
    assert meta["session_runs"]["decode"]["one_session_run"] is True
    assert {r["op"] for r in meta["runtime_ops"]} == {op}  # the prompt step stays split (prompt_slots.py)
    noisy = case == "keyformer_gumbel"  # its noise: one host input per layer, after the step graph's inputs
    assert d.get("host_inputs", []) == ([{"input": f"keyformer_noise{i}", "kind": "keyformer_gumbel", "seed": 3, "layer": i,
                                           "key_positions": f"key_positions{i}", "meta": f"keyformer_meta{i}", "heads": 4}
                                          for i in range(2)] if noisy else [])
    cap = d["capacity"]
    layer_states = [s["name"] for s in meta["state"] if s["layer"] is not None]
    assert sorted(cap) == sorted(layer_states)
    head = {"keyformer_meta0": 3, "keyformer_meta1": 3, "scissorhands_step0": 1, "scissorhands_step1": 1}
    for name, c in cap.items():
        if name in head:  # per-head state keeps its width
            assert c == {"slots": head[name], "fill": 0}
        elif kept is not None:
            assert c == {"slots": kept, "fill": -1 if name in KP else 0}
        else:
            assert c["grow"] == f"key_positions{name[-1]}"


@pytest.mark.parametrize("case", _cases())
def test_decode_state_shapes(runs, case):
    _, kept, _ = CASES[case]
    shapes = runs(case)["onnx"][3]
    if kept is not None:  # fixed capacity: padded once, then constant
        assert all(s == shapes[1] for s in shapes[1:])
        assert all(shapes[-1][kp][2] == kept for kp in KP) and shapes[-1]["k0"][2] == kept
        return
    for kp in KP:
        widths = [s[kp][2] for s in shapes[1:]]
        assert widths == sorted(widths) and all(w % GROW_SLACK == 0 for w in widths)
        assert len(set(widths)) <= 1 + max(widths) // GROW_SLACK


def test_io_binding_binds_the_decode_steps(runs, monkeypatch):
    """Scissorhands' uint8 ring is bound like the other state: every decode step of ``generate`` is one bound run."""
    folder = runs("scissorhands")["folder"]
    ids, mask = left_padded_batch(256, [9, 5], seed=2)
    gen = dict(max_new_tokens=20, eos_token_id=[], pad_token_id=0)
    want = gw.load(folder, io_binding=False).generate(ids, attention_mask=mask, **gen)
    calls = []
    run = OnnxStep._run_bound
    monkeypatch.setattr(OnnxStep, "_run_bound", lambda self, *a: calls.append(1) or run(self, *a))
    assert torch.equal(gw.load(folder).generate(ids, attention_mask=mask, **gen), want)
    assert len(calls) == 19  # the 19 decode steps; the prompt step runs its split op (session.run)


def test_gumbel_keyformer_generate_gives_the_torch_tokens(runs, onnx_artifact):
    """``gw.load``'s generate draws the noise each decode step, bound (I/O binding) or through ``session.run``."""
    cm, folder = onnx_artifact("tiny-llama", CASES["keyformer_gumbel"][0])
    runs("keyformer_gumbel")  # the export checked by the tests above
    ids, mask = left_padded_batch(256, [11, 6], seed=5)
    gen = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    want = cm.generate(ids, **gen)
    assert torch.equal(gw.load(folder).generate(ids, **gen), want)
    assert torch.equal(gw.load(folder, io_binding=False).generate(ids, **gen), want)


@pytest.mark.parametrize("recipe, reason", [
    ("evict(score='knorm', budget=8, window=2, when='every:3')", "evict(when='every') evicts on its schedule"),
    ("evict(score='knorm', budget=8, window=2)", "evict(when='prefill') evicts on its schedule"),  # knorm's default
])
def test_settings_left_split_at_decode_say_why(recipe, reason):
    cm = gw.compile(gw.load_model("tiny-llama")[0], recipe=recipe, verify=False)
    _, capacity, in_graph, left = decode_graph(cm.step_graph.gm, cm.step_graph.state)
    assert in_graph == [] and capacity == {}
    assert [x["layer"] for x in left] == [0, 1] and all(x["reason"].startswith(reason) for x in left)


@pytest.mark.parametrize("recipe", ["evict(score='tova', when='decode', budget=6)", "keyformer(kv=8, recent=0.25, noise='none')",
                                    "keyformer(kv=8, recent=0.25)"])
def test_layers_share_one_slot_function(recipe):
    """The layer index (unused by the in-graph settings) does not split the layers into one ONNX function each:
    one function per kind (the policy's, and decode_rows' per-KV-head ``slot_attention`` at T = 1)."""
    cm = gw.compile(gw.load_model("tiny-llama")[0], recipe=recipe, verify=False)
    gm, _, in_graph, left = decode_graph(cm.step_graph.gm, cm.step_graph.state)
    keys = slot_functions.wrap(gm)
    kinds = [key.rsplit("_", 1)[0] for key in keys]
    try:
        assert len(in_graph) == 2 and left == [] and len(kinds) == len(set(kinds))
        assert [k for k in kinds if k != "slot_attention"] in (["scored_decode"], ["scored_acc_decode"],
                                                               ["keyformer_decode"], ["scissorhands_decode"])
    finally:
        slot_functions.forget(keys)


# ----------------------------------------------------------------------------------- op level, random attention
SCALE = 1 / math.sqrt(8)


def _padded_op(decode, reference, names, capacity, params):
    """An ``op_decode_loop`` op: the reference at a prompt step (T > 1); at a decode step ``decode`` on the
    cached state padded to ``capacity`` first (``pad_to_capacity``, as ``OnnxStep`` does), the new token last."""
    def op(q, k, v, q_pos, k_pos, *extra):
        if q_pos.shape[1] > 1:
            return reference(q, k, v, q_pos, k_pos, *extra, *params)
        cached = pad_to_capacity([k[:, :, :-1], v[:, :, :-1], k_pos[..., :-1], *extra], names, [2] * len(names), capacity)
        kk, vv, kp = (torch.cat([c, x[:, :, -1:]], 2) for c, x in zip(cached[:3], (k, v, k_pos)))
        return decode(q, kk, vv, q_pos, kp, *cached[3:], *params)

    return op


def _capacity(names, slots, heads=None):
    """Slot states of ``names`` at ``slots`` (None: grow with key positions), head states at their widths."""
    cap = {n: {"slots": slots or 1, "fill": -1 if n == "k_pos" else 0, **({} if slots else {"grow": "k_pos"})} for n in names}
    cap.update({n: {"slots": w, "fill": 0} for n, w in (heads or {}).items()})
    return cap


def _per_token(k_pos, *slot_state):
    """[B][Hk] {position: (values of each slot state at that token)}."""
    return [[{int(p): tuple(tuple(s[b, h, j].reshape(-1).tolist()) for s in slot_state) for j, p in enumerate(k_pos[b, h])
              if p >= 0} for h in range(k_pos.shape[1])] for b in range(k_pos.shape[0])]


def _sets_over(op, extra, steps, prompt, per_token=None):
    out = []

    def on_step(L, kp, ex):
        out.append(([[sorted(h) for h in row] for row in kept_positions(kp)], per_token(kp, ex) if per_token else None))

    op_decode_loop(op, extra, steps, B=2, seed=1, prompt=prompt, on_step=on_step)
    return out


def _scored_params(scorer, budget_n, budget_f=0.0, sinks=0, window=0, window_f=0.0):
    return (SCALE, scorer, "decode", 0, 0, budget_n, budget_f, sinks, window, 1, "avg", "mean", 0, "each", 0.0, 0, 2, 512,
            0.0, 1.0, window_f)


@pytest.mark.parametrize("scorer", ["h2o", "knorm", "keydiff", "tova"])
@pytest.mark.parametrize("budget, slots", [(dict(budget_n=6, window=2), 6), (dict(budget_n=5, sinks=2), 5),
                                           (dict(budget_n=1, budget_f=0.2, window_f=0.05), None)])
@pytest.mark.parametrize("prompt", [10, 1])
def test_scored_decode_matches_the_reference(scorer, budget, slots, prompt):
    params = _scored_params(scorer, **budget)
    acc = scorer == "h2o"
    names = ["k", "v", "k_pos", *(["score"] if acc else [])]
    extra = [torch.zeros(2, 2, 0)] if acc else []

    def ref(q, k, v, q_pos, k_pos, *rest):
        return scored_reference(q, k, v, q_pos, k_pos, *rest, acc=acc)

    got = _sets_over(_padded_op(scored_acc_decode if acc else scored_decode, ref, names, _capacity(names, slots), params),
                     extra, 120, prompt)
    want = _sets_over(lambda *a: ref(*a, *params), extra, 120, prompt)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert max(len(h) for h in got[-1][0][0]) < 60  # it evicted


def _keyformer_with_host_noise(q, k, v, q_pos, k_pos, score, meta, *params):
    """``keyformer_decode`` with the noise ``OnnxStep`` feeds: ``keyformer_noise`` of the padded cached state."""
    record = {"seed": params[-3], "layer": params[-2], "key_positions": "k_pos", "meta": "meta"}  # (..., seed, layer, noise)
    zeta = keyformer_noise(record, [k_pos[..., :-1], meta], ["k_pos", "meta"], q.shape[1])
    return keyformer_decode(q, k, v, q_pos, k_pos, score, meta, *params, zeta=zeta)


@pytest.mark.parametrize("kv, recent, slots", [(6, 0.34, 5), (0.5, 0.0, None), (5, 0.5, 4)])
@pytest.mark.parametrize("prompt", [10, 1])
@pytest.mark.parametrize("noise", ["none", "gumbel"])
def test_keyformer_decode_matches_the_reference(kv, recent, slots, prompt, noise):
    kv_n, kv_f = (kv, 0.0) if isinstance(kv, int) else (0, kv)
    params = (SCALE, kv_n, kv_f, recent, 1.0, 0.02, 7, 1, noise)
    names = ["k", "v", "k_pos", "score", "meta"]
    cap = _capacity(names[:4], slots, {"meta": 3})
    extra = [torch.zeros(2, 2, 0), torch.zeros(2, 2, 0, dtype=torch.long)]
    decode = _keyformer_with_host_noise if noise == "gumbel" else keyformer_decode
    got = _sets_over(_padded_op(decode, keyformer_reference, names, cap, params), extra, 120, prompt,
                     per_token=lambda kp, ex: ex[1].tolist())
    want = _sets_over(lambda *a: keyformer_reference(*a, *params), extra, 120, prompt,
                      per_token=lambda kp, ex: ex[1].tolist())
    assert got == want  # kept sets and the meta state (frozen budget, step counter)
    assert max(len(h) for h in got[-1][0][0]) < 20


@pytest.mark.parametrize("budget, history, recent, sinks", [(6, 9, 2, 1), (5, 16, 0, 0), (4, 3, 3, 1), (3, 8, 4, 0)])
@pytest.mark.parametrize("prompt", [10, 1])
def test_scissorhands_decode_matches_the_reference(budget, history, recent, sinks, prompt):
    params = (SCALE, budget, history, recent, sinks)
    names = ["k", "v", "k_pos", "bits", "count", "step"]
    cap = _capacity(names[:5], max(budget - 1, recent + sinks, 1), {"step": 1})
    W = ring_bytes(history)
    extra = [torch.zeros(2, 2, 0, W, dtype=torch.uint8), torch.zeros(2, 2, 0, dtype=torch.int32),
             torch.zeros(2, 2, 0, dtype=torch.long)]

    def per_token(kp, ex):  # each kept token's ring bytes and count, and the ring index
        return _per_token(kp, ex[0], ex[1]), ex[2].tolist()

    got = _sets_over(_padded_op(scissorhands_decode, scissorhands_reference, names, cap, params), extra, 120, prompt,
                     per_token)
    want = _sets_over(lambda *a: scissorhands_reference(*a, *params), extra, 120, prompt, per_token)
    assert got == want
    assert max(len(h) for h in got[-1][0][0]) <= max(budget - 1, recent + sinks)
