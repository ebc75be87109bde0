"""ONNX native sliding-window layers hold only their window (``codegen/onnx/sliding_window.py``).

tiny-gemma3 (layer 0 slides over 8 tokens, layer 1 is global), batch 2 left-padded prompts longer
than the window: ONNX Runtime's ``last_stats["kv_bytes"]`` equals the bytes of HF's ``DynamicCache``
tensors (which keep the last w - 1 tokens of a sliding layer) after the prefill and after 31 new
tokens, with HF's greedy tokens; over 30 decode steps the artifact's logits and tokens equal the
torch backend's (<= 1e-4) and its sliding layer keeps each row's last 7 positions; the prompt and
decode steps are one session run each.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import graphwright as gw
from graphwright.codegen.onnx.artifact import OnnxStep
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, state_of
from tests.runtime.test_sliding_cache import LENGTHS, hf_cache_bytes


@pytest.fixture(scope="module")
def gemma(onnx_artifact):
    cm, folder = onnx_artifact("tiny-gemma3", "identity")
    return cm, folder, json.loads((folder / "graphwright.json").read_text())


def test_metadata_records_the_bounded_layer(gemma):
    cm, _, meta = gemma
    assert meta["sliding_windows"] == {"0": {"window": 8, "cached_tokens": 7}}
    assert [s["name"] for s in meta["state"]] == [s.name for s in cm.runtime_graph.state]  # the torch runtime's layout
    assert meta["runtime_ops"] == [] and meta["decode"]["runtime_ops"] == []
    assert meta["session_runs"]["prompt"]["one_session_run"] and meta["session_runs"]["decode"]["one_session_run"]
    assert meta["prompt"]["capacity"] == {"k0": 7, "v0": 7, "key_positions0": 7}
    assert {c["slots"] for c in meta["decode"]["capacity"].values()} == {7}


@pytest.mark.parametrize("new", [1, 31])
def test_kv_bytes_equal_hf_cache(tiny, gemma, new):
    """new = 1: after the prefill (HF holds the last 7 prompt columns of the sliding layer); 31: past the window."""
    cm, folder, _ = gemma
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    hf = tiny("tiny-gemma3").generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                                      eos_token_id=None, return_dict_in_generate=True)
    rt = gw.load(folder)
    got = rt.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, hf.sequences)
    assert rt.last_stats["kv_bytes"] == hf_cache_bytes(hf.past_key_values)
    cm.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
    assert rt.last_stats["kv_bytes"] == cm.last_stats["kv_bytes"]


def test_logits_and_window_equal_the_torch_backend(gemma):
    cm, folder, meta = gemma
    step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
    onnx = SimpleNamespace(step_graph=cm.runtime_graph, _step=step)
    ids, mask = left_padded_batch(256, LENGTHS, seed=2)
    sets, widths = [], []

    def on_step(i, state):
        sets.append([[sorted(h) for h in row] for row in kept_positions(state_of(onnx, state, "key_positions0"))])
        widths.append((state_of(onnx, state, "k0").shape[2], state_of(onnx, state, "k1").shape[2]))

    got, toks, _ = decode_loop(onnx, ids, mask, 30, on_step)
    want, want_toks, _ = decode_loop(cm, ids, mask, 30)
    assert torch.equal(toks, want_toks) and (got - want).abs().max() <= 1e-4
    for i, step_sets in enumerate(sets):
        assert step_sets == [[list(range(n + i - 7, n + i))] * 2 for n in LENGTHS]
    assert widths == [(7, 20 + i) for i in range(31)]
