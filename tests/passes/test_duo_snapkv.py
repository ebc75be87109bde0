"""``duo + snapkv``: SnapKV compresses the retrieval heads' prompt cache, streaming heads keep sinks + window.

Oracle: dense attention under the combined boolean mask. The masked model is the reference backend
with per-head key positions and nothing evicted (``snapkv(budget=100000)``); before every step the
oracle sets to -1 (masked) the positions a head must not see: on a retrieval head the prompt tokens
SnapKV alone drops (its kept set after the same dense prefill, per row and KV head; SnapKV's own
selection is checked against a loop oracle in ``test_snapkv.py``), on a streaming head every key j
with j >= sinks and i - j > window for the next query position i (``test_duo.py``'s rule).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from graphwright import RecipeError
from graphwright.runtime.score import stream_logits
from tests.conftest import left_padded_batch
from tests.passes.duo_common import GEN, assert_generates_alike, compile_tiny, dense_stream_logits, hide_outside_streaming_window, state_by_name

PROMPT, PREFILL, SINKS, WINDOW, BUDGET, OBS = dict(lengths=(80, 73), seed=3), 24, 2, 5, 8, 2
RETRIEVAL = {(0, 0)}  # layer 0 split (KV head 0 retrieval, 1 streaming); layer 1 all streaming
DUO = f"duo(retrieval=[[0, 0]], sinks={SINKS}, window={WINDOW})"
SNAP = f"snapkv(budget={BUDGET}, window={OBS})"


@functools.lru_cache(maxsize=None)
def _oracle():
    """(logits under the combined mask, plain dense logits, SnapKV alone's kept prompt positions per layer)."""
    ids, mask = left_padded_batch(256, **PROMPT)
    snap = compile_tiny(SNAP, "reference")
    _, st = snap._step(ids[:, :PREFILL], gw_positions(mask)[:, :PREFILL], torch.arange(PREFILL),
                       [s.empty(2, torch.device("cpu")) for s in snap.runtime_graph.state])
    kept = {layer: state_by_name(snap, st)[f"key_positions{layer}"] for layer in range(2)}  # [B, Hk, budget]
    masked = compile_tiny("snapkv(budget=100000)", "reference")  # per-head positions, nothing evicted
    names = [s.name for s in masked.runtime_graph.state]
    positions = gw_positions(mask)
    step_at = iter(range(PREFILL, ids.shape[1] + 1))

    def oracle(i, p, idx, state):
        state = list(state)
        if i.shape[1] == 1:  # a decode step: hide what the combined cache does not hold
            t = next(step_at)
            q = positions[:, t][:, None]  # [B, 1]: the query's position
            for layer in range(2):
                j = names.index(f"key_positions{layer}")
                kp = state[j].clone()  # [B, Hk, S]
                for h in range(2):
                    if (layer, h) in RETRIEVAL:
                        prompt = (kp[:, h] >= 0) & (kp[:, h] < positions[:, PREFILL - 1:PREFILL] + 1)
                        held = (kp[:, h, :, None] == kept[layer][:, h, None, :]).any(-1)
                        kp[:, h] = kp[:, h].masked_fill(prompt & ~held, -1)
                    else:
                        kp[:, h] = hide_outside_streaming_window(kp[:, h], q, SINKS, WINDOW)
                state[j] = kp
        return masked._step(i, p, idx, state)

    want, _ = stream_logits(oracle, masked.runtime_graph.state, ids, mask, PREFILL)
    plain = dense_stream_logits(ids, mask, PREFILL)
    return want, plain, kept


def gw_positions(mask):
    from graphwright.capture.step_graph import positions_from_mask

    return positions_from_mask(mask)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_equals_dense_attention_under_the_combined_mask(backend):
    """56 teacher-forced decode steps after a 24-token prefill (batch 2 left-padded: 24 and 17 real prompt tokens)."""
    ids, mask = left_padded_batch(256, **PROMPT)
    want, plain, kept = _oracle()
    cm = compile_tiny(f"{DUO} + {SNAP}", backend)
    got, state = stream_logits(cm._step, cm.runtime_graph.state, ids, mask, PREFILL)
    real = mask.bool()
    assert (got - want)[real].abs().max().item() <= 1e-4
    assert (got - plain)[real].abs().max().item() > 0.1  # the mask really acts on these steps
    st = state_by_name(cm, state)
    steps = ids.shape[1] - PREFILL
    # retrieval head: SnapKV's budget after prefill, then one slot per decode step; its prompt set is SnapKV alone's
    assert st["k0"].shape == (2, 1, BUDGET + steps, 16) and st["duo_k0"].shape == (2, 1, SINKS + WINDOW, 16)
    for b in range(2):
        prompt = st["key_positions0"][b, 0, :BUDGET]
        assert torch.equal(prompt.sort().values, kept[0][b, 0].sort().values)
    assert st["k1"].shape == (2, 2, SINKS + WINDOW, 16)  # layer 1: duo alone (every head streams)
    notes = cm.step_graph.notes
    assert notes["pass_order"]["order"] == ["duo", "snapkv"]
    assert notes["duo"]["snapkv"]["layers"] == [0] and notes["duo"]["snapkv"]["all_streaming_layers_left_to_duo"] == [1]


def test_kv_bytes_are_the_three_caches():
    ids, mask = left_padded_batch(256, (30, 22), seed=1)
    cm = compile_tiny(f"{DUO} + {SNAP}")
    cm.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    B, D, kv = 2, 16, 2 * 4  # K and V, fp32
    ret = BUDGET + 9  # layer 0's retrieval head: the compressed prompt + 9 decode tokens fed back
    stream = 1 * (SINKS + WINDOW) + 2 * (SINKS + WINDOW)  # layer 0: one streaming head; layer 1: two
    assert cm.last_stats["kv_bytes"] == B * D * kv * (ret + stream)
    assert cm.last_stats["kept_tokens_per_head"] == [[[17, 7], [17, 7]], [[7, 7], [7, 7]]]


def test_budget_covering_the_prompt_is_duo_alone():
    ids, mask = left_padded_batch(256, (30, 22), seed=1)
    both, duo = compile_tiny(f"{DUO} + snapkv(budget=64)"), compile_tiny(DUO)
    real = mask.bool()
    assert (both.logits(ids, attention_mask=mask) - duo.logits(ids, attention_mask=mask))[real].abs().max().item() <= 1e-5
    assert_generates_alike(both, duo, ids, mask)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_all_heads_retrieval_is_snapkv_alone(name):
    ids, mask = left_padded_batch(256, (30, 22), seed=1)
    every = "duo(retrieval=[[0, 0], [0, 1], [1, 0], [1, 1]], sinks=0, window=1)"
    both, snap = compile_tiny(f"{every} + {SNAP}", name=name), compile_tiny(SNAP, name=name)
    assert [s.name for s in both.step_graph.state] == [s.name for s in snap.step_graph.state]
    assert_generates_alike(both, snap, ids, mask)


@pytest.mark.parametrize("other,words", [
    ("snapkv(budget=8, pyramid=20)", ["pyramid", "not implemented"]),
    ("snapkv(budget=8, layers=[1])", ["layer(s) [1]", "streaming", "[0]"]),
    ("fastgen()", ["duo", "fastgen", "only snapkv, h2o and evict"]),
])
def test_refused_forms_say_why(other, words):
    with pytest.raises(RecipeError) as err:
        compile_tiny(f"{DUO} + {other}")
    for w in words:
        assert w in str(err.value), str(err.value)


def test_cli_compiles_the_composition(tmp_path, capsys):
    from graphwright.cli.main import main

    out = tmp_path / "report.json"
    assert main(["compile", "--model", "tiny-llama", "--recipe", f"{DUO} + {SNAP}", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["summary"]["passes"] == ["duo", "snapkv"]
    assert [(r["duo"], r["snapkv"]) for r in rep["rows"]] == [("retrieval=[0] streaming=[1]", f"budget={BUDGET}"),
                                                             ("retrieval=[] streaming=[0,1]", None)]
    assert "duo -> snapkv" in " ".join(capsys.readouterr().out.split())
    assert main(["compile", "--model", "tiny-llama", "--recipe", f"{DUO} + snapkv(budget=8, pyramid=20)"]) == 2
