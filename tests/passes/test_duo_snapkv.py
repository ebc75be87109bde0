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
from graphwright.capture.step_graph import positions_from_mask
from tests.conftest import left_padded_batch
from tests.passes import duo_common
from tests.passes.duo_common import PREFILL, PROMPT, TOKEN_BYTES, compile_tiny, state_by_name

SINKS, WINDOW, BUDGET, OBS = 2, 5, 8, 2
RETRIEVAL = {(0, 0)}  # layer 0 split (KV head 0 retrieval, 1 streaming); layer 1 all streaming
DUO = f"duo(retrieval=[[0, 0]], sinks={SINKS}, window={WINDOW})"
SNAP = f"snapkv(budget={BUDGET}, window={OBS})"


@functools.lru_cache(maxsize=None)
def _oracle():
    """(logits under the combined mask, plain dense logits, SnapKV alone's kept prompt positions per layer); the
    masked model keeps per-head positions and evicts nothing (``snapkv(budget=100000)``)."""
    ids, mask = left_padded_batch(256, **PROMPT)
    snap = compile_tiny(SNAP, "reference")
    _, st = snap._step(ids[:, :PREFILL], positions_from_mask(mask)[:, :PREFILL], torch.arange(PREFILL),
                       [s.empty(2, torch.device("cpu")) for s in snap.runtime_graph.state])
    kept = {layer: state_by_name(snap, st)[f"key_positions{layer}"] for layer in range(2)}  # [B, Hk, budget]

    def hidden(layer, h, kp, state, t, positions):
        held = (kp[:, :, None] == kept[layer][:, h, None, :]).any(-1)
        return duo_common.prompt_keys(kp, positions) & ~held

    return (*duo_common.combined_mask_logits("snapkv(budget=100000)", RETRIEVAL, hidden, SINKS, WINDOW), kept)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_equals_dense_attention_under_the_combined_mask(backend):
    """56 teacher-forced decode steps after a 24-token prefill (batch 2 left-padded: 24 and 17 real prompt tokens)."""
    want, plain, kept = _oracle()
    cm = compile_tiny(f"{DUO} + {SNAP}", backend)
    st = duo_common.stream_against_oracle(cm, want, plain)
    steps = max(PROMPT["lengths"]) - PREFILL
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
    kv_bytes, kept = duo_common.kv_bytes_after_generate(f"{DUO} + {SNAP}")
    ret = BUDGET + 9  # layer 0's retrieval head: the compressed prompt + 9 decode tokens fed back
    stream = 1 * (SINKS + WINDOW) + 2 * (SINKS + WINDOW)  # layer 0: one streaming head; layer 1: two
    assert kv_bytes == TOKEN_BYTES * (ret + stream)
    assert kept == [[[17, 7], [17, 7]], [[7, 7], [7, 7]]]


def test_budget_covering_the_prompt_is_duo_alone():
    duo_common.assert_budget_covering_is_duo_alone(DUO, "snapkv(budget=64)", prefill=None)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_all_heads_retrieval_is_snapkv_alone(name):
    duo_common.assert_all_heads_retrieval_is_policy_alone(SNAP, name)


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
