"""``duo + snapkv(heads='adaptive')`` (and ``evict(rule='adaptive')``): Ada-KV packed over the retrieval heads only.

Two oracles. (1) The kept sets: the prefill is dense on every head, so the retrieval heads' Ada-KV
selection is the spec's loop oracle (``test_snapkv_adaptive._oracle``: window scores, pooling, global
sort over the heads given, safeguard, per-head top-n) run on the dense model's prefill queries and keys
of the retrieval heads alone (recorded from the dense step graph); a layer's total is H_ret * budget.
(2) The logits: dense attention under the combined boolean mask over 56 decode steps (the masked
model is the reference backend with per-head positions and nothing evicted): on a retrieval head
the prompt keys outside its kept set are hidden, on a streaming head every key j >= sinks with
i - j > window (``test_duo.py``'s rule).
"""

from __future__ import annotations

import functools

import pytest
import torch

from graphwright import RecipeError
from graphwright.capture.ops import ATTENTION
from graphwright.capture.step_graph import positions_from_mask
from graphwright.ops import schema
from graphwright.runtime.score import stream_logits
from tests.conftest import left_padded_batch
from tests.passes import duo_common
from tests.passes.duo_common import EVERY_HEAD_RETRIEVAL, GEN, PREFILL, PROMPT, SMALL, TOKEN_BYTES, compile_tiny, state_by_name
from tests.passes.test_snapkv_adaptive import _oracle as adakv_loop_oracle

SINKS, WINDOW, BUDGET, OBS = 2, 5, 6, 2
RETRIEVAL = {(0, 0), (1, 0), (1, 1)}  # layer 0 split (KV head 0 retrieval, 1 streaming); layer 1 all retrieval
DUO = f"duo(retrieval=[[0, 0], [1, 0], [1, 1]], sinks={SINKS}, window={WINDOW})"
ADA = f"snapkv(budget={BUDGET}, window={OBS}, heads='adaptive', floor=0.0)"


def _dense_prefill_attention(ids, mask) -> dict:
    """{layer: (q, k, q_pos, k_pos, scale)} of the dense model's prefill attention nodes."""
    dense = compile_tiny("", "reference")
    seen, names = {}, schema.arg_names(ATTENTION)

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target is ATTENTION:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                a = {**dict(zip(names, args)), **kwargs}
                seen[schema.layer_of(n)] = (a["q"], a["k"], a["q_pos"], a["k_pos"], a["scale"])
            return out

    state = [s.empty(ids.shape[0], torch.device("cpu")) for s in dense.step_graph.state]
    with torch.no_grad():
        Record(dense.step_graph.gm).run(ids, positions_from_mask(mask), torch.arange(ids.shape[1]), *state)
    return seen


@functools.lru_cache(maxsize=None)
def _kept_by_spec() -> dict:
    """{layer: [B][H_ret] kept prompt positions} of Ada-KV over the retrieval heads, by the loop oracle."""
    ids, mask = left_padded_batch(256, **PROMPT)
    att = _dense_prefill_attention(ids[:, :PREFILL], mask[:, :PREFILL])
    out = {}
    for layer in range(2):
        q, k, q_pos, k_pos, scale = att[layer]
        hk = k.shape[1]
        g = q.shape[1] // hk
        ret = [h for h in range(hk) if (layer, h) in RETRIEVAL]
        qs = q[:, [h * g + j for h in ret for j in range(g)]]
        kpd = k_pos[:, None].expand(-1, len(ret), -1) if k_pos.dim() == 2 else k_pos[:, ret]
        out[layer] = adakv_loop_oracle(qs, k[:, ret], q_pos, kpd, scale, BUDGET, OBS, 5, "avg", True, 0.0, layer, 2, 0.0)
    return out


@functools.lru_cache(maxsize=None)
def _oracle():
    """(logits under the combined mask, plain dense logits); the masked model keeps per-head positions and evicts
    nothing (``snapkv(budget=100000)``)."""
    kept = _kept_by_spec()

    def hidden(layer, h, kp, state, t, positions):
        r = [g for g in range(2) if (layer, g) in RETRIEVAL].index(h)  # h among the layer's retrieval heads
        held = torch.stack([torch.isin(kp[b], torch.tensor(kept[layer][b][r])) for b in range(kp.shape[0])])
        return duo_common.prompt_keys(kp, positions) & ~held

    return duo_common.combined_mask_logits("snapkv(budget=100000)", RETRIEVAL, hidden, SINKS, WINDOW)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("order", ["duo_first", "snapkv_first"])
def test_equals_dense_attention_under_the_combined_mask(backend, order):
    kept = _kept_by_spec()
    cm = compile_tiny(f"{DUO} + {ADA}" if order == "duo_first" else f"{ADA} + {DUO}", backend)
    st = duo_common.stream_against_oracle(cm, *_oracle())
    steps = max(PROMPT["lengths"]) - PREFILL
    for layer in range(2):  # packed caches: [B, 1, N, D], per-head positions [B, H_ret, N]
        kp = st[f"key_positions{layer}"]
        n_ret = len(kept[layer][0])
        assert st[f"k{layer}"].shape[:2] == (2, 1) and kp.shape[1] == n_ret
        for b in range(2):
            for r in range(n_ret):
                prompt = kp[b, r][(kp[b, r] >= 0) & (kp[b, r] < PREFILL - (b > 0) * 7)]
                assert sorted(prompt.tolist()) == kept[layer][b][r]
            # floor 0: the layer keeps exactly H_ret * budget prompt slots, plus one slot per head and decode step
            assert int((kp[b] >= 0).sum()) == n_ret * (BUDGET + steps)
    assert any(len({len(h) for h in row}) > 1 for row in kept[1])  # the split over layer 1's two heads is ragged
    assert st["duo_k0"].shape == (2, 1, SINKS + WINDOW, 16)
    notes = cm.step_graph.notes
    assert notes["pass_order"]["order"] == ["duo", "snapkv"] and notes["duo"]["snapkv"]["layers"] == [0, 1]


def test_kv_bytes_are_the_packed_and_streaming_caches():
    kv_bytes, _ = duo_common.kv_bytes_after_generate(f"{DUO} + {ADA}")
    packed = 1 * (BUDGET + 9) + 2 * (BUDGET + 9)  # layer 0: one retrieval head; layer 1: two (floor 0: H_ret * budget)
    assert kv_bytes == TOKEN_BYTES * (packed + SINKS + WINDOW)


def test_budget_covering_the_prompt_is_duo_alone():
    duo_common.assert_budget_covering_is_duo_alone(DUO, "snapkv(budget=64, heads='adaptive')")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_all_heads_retrieval_is_adaptive_snapkv_alone(name):
    duo_common.assert_all_heads_retrieval_is_policy_alone(ADA, name)


def test_evict_adaptive_scored_packs_the_retrieval_heads():
    """``evict(score='knorm', rule='adaptive')`` (the scored packed op) on duo's retrieval part: packed over H_ret heads."""
    ids, mask = left_padded_batch(256, **SMALL)
    cm = compile_tiny(f"{DUO} + evict(score='knorm', budget={BUDGET}, rule='adaptive', floor=0.0)")
    _, state = stream_logits(cm._step, cm.runtime_graph.state, ids, mask, 20)
    st = state_by_name(cm, state)
    assert st["key_positions0"].shape[1] == 1 and st["key_positions1"].shape[1] == 2
    for b in range(2):
        assert int((st["key_positions1"][b] >= 0).sum()) == 2 * (BUDGET + 10)  # 10 decode steps appended per head
    both = compile_tiny(f"{EVERY_HEAD_RETRIEVAL} + evict(score='knorm', budget={BUDGET}, rule='adaptive')")
    alone = compile_tiny(f"evict(score='knorm', budget={BUDGET}, rule='adaptive')")
    assert torch.equal(both.generate(ids, attention_mask=mask, max_new_tokens=8, **GEN),
                       alone.generate(ids, attention_mask=mask, max_new_tokens=8, **GEN))


def test_pyramid_after_duo_is_refused():
    with pytest.raises(RecipeError, match=r"pyramid=.*not implemented"):
        compile_tiny(f"{DUO} + snapkv(budget=8, pyramid=20)")
