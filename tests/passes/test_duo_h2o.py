"""``duo + h2o``: H2O evicts the retrieval heads' cache at every step, streaming heads keep sinks + window.

Oracle: dense attention under the combined boolean mask. The masked model is the reference backend
with per-head key positions, cumulative scores and nothing evicted (``h2o(heavy=1.0)``); before every
decode step the oracle sets to -1 (masked, then dropped) the positions a head must not see: on a
retrieval head every key outside H2O's set -- the last RECENT positions of the row plus the HEAVY
highest cumulative scores among the older ones, the scores read from the masked model's own state
(attention summed over every query so far, mean over the KV head's query heads; a masked key
receives none) -- and on a streaming head every key j with j >= sinks and i - j > window for the next
query position i (``test_duo.py``'s rule). The H2O op's own selection is checked against a loop
oracle in ``test_h2o.py``; here the rule is written again from the paper (arXiv 2306.14048).
"""

from __future__ import annotations

import functools

import pytest
import torch

from graphwright import RecipeError
from graphwright.runtime.score import stream_logits
from tests.conftest import left_padded_batch
from tests.passes import duo_common
from tests.passes.duo_common import TOKEN_BYTES, compile_tiny, state_by_name

SINKS, WINDOW, HEAVY, RECENT = 2, 5, 4, 3
RETRIEVAL = {(0, 0)}  # layer 0 split (KV head 0 retrieval, 1 streaming); layer 1 all streaming
DUO = f"duo(retrieval=[[0, 0]], sinks={SINKS}, window={WINDOW})"
H2O = f"h2o(heavy={HEAVY}, recent={RECENT})"


def h2o_hidden(kp: torch.Tensor, score: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: held keys (kp >= 0) outside H2O's set for one KV head -- keep the last RECENT positions of the
    row (kp >= length - RECENT) and the HEAVY highest scores among the other held keys."""
    held = kp >= 0
    recent = held & (kp >= length[:, None] - RECENT)
    older = held & ~recent
    keep = recent.clone()
    for b in range(kp.shape[0]):
        idx = older[b].nonzero().flatten()
        top = idx[score[b, idx].topk(min(HEAVY, len(idx))).indices]
        keep[b, top] = True
    return held & ~keep


@functools.lru_cache(maxsize=None)
def _oracle():
    """(logits under the combined mask, plain dense logits); the masked model keeps per-head positions and scores
    and evicts nothing (``h2o(heavy=1.0)``), the scores read from its own state before each step."""

    def hidden(layer, h, kp, state, t, positions):
        length = positions[:, t - 1] + 1  # the row's length after the previous step
        return h2o_hidden(kp, state[f"attn_score{layer}"][:, h], length)

    return duo_common.combined_mask_logits("h2o(heavy=1.0)", RETRIEVAL, hidden, SINKS, WINDOW)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("order", ["duo_first", "h2o_first"])
def test_equals_dense_attention_under_the_combined_mask(backend, order):
    """56 teacher-forced decode steps after a 24-token prefill (batch 2 left-padded: 24 and 17 real prompt tokens)."""
    cm = compile_tiny(f"{DUO} + {H2O}" if order == "duo_first" else f"{H2O} + {DUO}", backend)
    st = duo_common.stream_against_oracle(cm, *_oracle())
    # layer 0: one retrieval head holding heavy + recent, one streaming head holding sinks + window; layer 1 duo's
    assert st["k0"].shape == (2, 1, HEAVY + RECENT, 16) and st["duo_k0"].shape == (2, 1, SINKS + WINDOW, 16)
    assert st["attn_score0"].shape == (2, 1, HEAVY + RECENT) and "attn_score1" not in st
    assert st["k1"].shape == (2, 2, SINKS + WINDOW, 16)
    notes = cm.step_graph.notes
    assert notes["pass_order"]["order"] == ["duo", "h2o"]
    assert notes["duo"]["h2o"]["layers"] == [0] and notes["duo"]["h2o"]["all_streaming_layers_left_to_duo"] == [1]


def test_evict_h2o_preset_equals_h2o_after_duo():
    """``evict(score='h2o', when='decode', budget=H+R, window=R)`` is ``h2o(heavy=H, recent=R)``, also on duo's retrieval part."""
    ids, mask = left_padded_batch(256, (40, 33), seed=4)
    h2o = compile_tiny(f"{DUO} + {H2O}")
    ev = compile_tiny(f"{DUO} + evict(score='h2o', when='decode', budget={HEAVY + RECENT}, window={RECENT})")
    a, _ = stream_logits(h2o._step, h2o.runtime_graph.state, ids, mask, 20)
    b, _ = stream_logits(ev._step, ev.runtime_graph.state, ids, mask, 20)
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-5
    assert ev.step_graph.notes["duo"]["evict"]["layers"] == [0]


def test_kv_bytes_are_the_caches_held():
    kv_bytes, kept = duo_common.kv_bytes_after_generate(f"{DUO} + {H2O}")
    ret = HEAVY + RECENT  # layer 0's retrieval head, evicted at every step
    stream = 1 * (SINKS + WINDOW) + 2 * (SINKS + WINDOW)  # layer 0: one streaming head; layer 1: two
    assert kv_bytes == TOKEN_BYTES * (ret + stream)
    assert kept == [[[7, 7], [7, 7]], [[7, 7], [7, 7]]]


def test_budget_covering_the_length_is_duo_alone():
    duo_common.assert_budget_covering_is_duo_alone(DUO, "h2o(heavy=1.0, recent=0.0)")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_all_heads_retrieval_is_h2o_alone(name):
    duo_common.assert_all_heads_retrieval_is_policy_alone(H2O, name)


@pytest.mark.parametrize("other,words", [
    ("h2o(heavy=4, recent=4, layers=[1])", ["layer(s) [1]", "streaming", "[0]"]),
    ("fastgen()", ["duo", "fastgen is not implemented on the retrieval part"]),
    ("streaming(sinks=4, window=8)", ["streaming is refused", "already are sinks + window",
                                      "evict(score='h2o', budget=S+W, sinks=S, window=W)"]),
    ("evict(score='keyformer', budget=8)", ["keyformer", "not implemented", "score='h2o'"]),
    ("evict(score='tova', budget=8, rule='pyramid')", ["rule='pyramid'"]),
])
def test_refused_forms_say_why(other, words):
    with pytest.raises(RecipeError) as err:
        compile_tiny(f"{DUO} + {other}")
    for w in words:
        assert w in str(err.value), str(err.value)


def test_sinks_and_a_larger_window_on_the_retrieval_heads():
    """What the streaming refusal points to: evict with budget = sinks + window keeps exactly the first S and last W
    positions on the retrieval heads (no scored token fits), while duo's streaming heads keep their own smaller window."""
    ids, mask = left_padded_batch(256, (40, 33), seed=2)
    cm = compile_tiny(f"{DUO} + evict(score='h2o', budget=10, sinks=3, window=7)")
    _, state = stream_logits(cm._step, cm.runtime_graph.state, ids, mask, 20)
    st = state_by_name(cm, state)
    for b, n in enumerate((40, 33)):
        assert sorted(st["key_positions0"][b, 0].tolist()) == [0, 1, 2] + list(range(n - 7, n))
        assert sorted(st["duo_positions0"][b, 0].tolist()) == list(range(SINKS)) + list(range(n - WINDOW, n))


def test_cli_compiles_the_composition(tmp_path):
    import json

    from graphwright.cli.main import main

    out = tmp_path / "report.json"
    assert main(["compile", "--model", "tiny-llama", "--recipe", f"{H2O} + {DUO}", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["summary"]["passes"] == ["duo", "h2o"]
    assert [r["duo"] for r in rep["rows"]] == ["retrieval=[0] streaming=[1]", "retrieval=[] streaming=[0,1]"]
    assert rep["rows"][0]["h2o"] is not None and rep["rows"][1]["h2o"] is None
