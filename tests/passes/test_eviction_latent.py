"""Eviction over latent caches (lowrank_kv first): union of the KV heads' sets, identity, budget, refusals."""

from __future__ import annotations

import functools

import pytest
import torch

from graphwright import RecipeError
from graphwright.ops.eviction_ref import h2o_reference
from graphwright.ops.fastgen_ref import fastgen_reference
from graphwright.ops.latent_attention import LATENT_ATTENTION
from graphwright.passes.base import PassContext
from graphwright.passes.fastgen import FastGen
from graphwright.passes.h2o import H2O
from graphwright.passes.lowrank_kv import LowRankKV
from graphwright.passes.snapkv import SnapKV
from graphwright.passes.streaming import Streaming
from tests.conftest import _compiled, _tiny, left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, random_step, run_pass, state_of
from tests.passes.test_eviction_ops import SCALE

LENGTHS = [12, 7]


@functools.lru_cache(maxsize=None)
def _lowrank():
    from graphwright.compiled import CompiledModel

    sg = LowRankKV(keep=0.5).run(_compiled("tiny-llama").step_graph.copy(), PassContext(model=_tiny("tiny-llama")))
    return CompiledModel(sg)


def test_shared_payload_keeps_the_union_of_head_sets():
    q, k, v, q_pos, k_pos = random_step(T=2, seed=3, holes=False)
    S = k.shape[2] - 2
    payload = torch.randn(k.shape[0], 1, k.shape[2], 5)
    score = torch.rand(k.shape[0], k.shape[1], S, generator=torch.Generator().manual_seed(1))
    per_head = h2o_reference(q, k, v, q_pos, k_pos, score, SCALE, 2, 0.0, 2, 0.0)
    shared = h2o_reference(q, k, payload, q_pos, k_pos, score, SCALE, 2, 0.0, 2, 0.0)
    for b, heads in enumerate(kept_positions(per_head[2])):
        union = sorted(set().union(*heads))
        assert len(union) > max(len(h) for h in heads)  # the heads disagree: the union is larger
        assert kept_positions(shared[2])[b] == [union] * len(heads)
        slots = [int((k_pos[b, 0] == p).nonzero()) for p in union]
        torch.testing.assert_close(shared[1][b, 0, :len(union)], payload[b, 0, slots])
    # fastgen: a head with policy full keeps everything, so the shared payload keeps everything
    new_cls = torch.zeros(q_pos.shape, dtype=torch.int8)
    cls = torch.zeros(*score.shape, dtype=torch.int8)
    pol = torch.tensor([[[4], [0]], [[0], [0]]])
    out = fastgen_reference(q, k, payload, q_pos, k_pos, score, cls, new_cls, pol, SCALE, 0.9, 0, 0.3, 0, 0.3, "mass", "")
    kp = kept_positions(out[2])
    assert kp[0][0] == kp[0][1] == [int(p) for p in k_pos[0, 0] if p >= 0]
    assert kp[1] == [[], []]  # special-only heads (no special ids here) keep nothing after attending


def test_lowrank_then_fastgen_recovery_one_is_identity():
    base = _lowrank()
    ev = run_pass(base, FastGen(recovery=1.0))
    assert len(ev.step_graph.nodes(LATENT_ATTENTION)) == 2
    assert ev.step_graph.notes["fastgen"]["settings"]["latent_layers"] == 2
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    want_logits, want, _ = decode_loop(base, ids, mask, 24)
    got_logits, got, _ = decode_loop(ev, ids, mask, 24)
    assert torch.equal(got, want)
    assert (got_logits - want_logits).abs().max() <= 1e-4


def test_lowrank_then_h2o_budget_and_dense_prefill():
    base = _lowrank()
    ev = run_pass(base, H2O(heavy=2, recent=2))
    ids, mask = left_padded_batch(256, LENGTHS, seed=2)
    dense, _, _ = decode_loop(base, ids, mask, 0)
    hk = ev.info.num_kv_heads
    widths = {s.layer: s.shape[-1] for s in ev.step_graph.state if s.name == f"k{s.layer}_latent"}

    def check(i, state):
        real = torch.tensor(LENGTHS) + i
        for layer in range(2):
            kp = state_of(ev, state, f"key_positions{layer}")
            kept = (kp >= 0).sum(-1)
            assert (kp == kp[:, :1]).all()  # one shared set per layer
            assert (kept[:, 0] <= torch.clamp(real, max=hk * 4)).all() and (kept[:, 0] >= torch.clamp(real, max=4)).all()
            c_k = state_of(ev, state, f"k{layer}_latent")
            assert c_k.shape[1] == kp.shape[-1] and c_k.shape[-1] == widths[layer]  # the latent cache really shrank

    logits, _, _ = decode_loop(ev, ids, mask, 20, on_step=check)
    assert torch.equal(logits[0], dense[0])  # prefill is dense: the first token equals lowrank_kv alone


def test_lowrank_then_snapkv_and_streaming_refusal():
    base = _lowrank()
    ev = run_pass(base, SnapKV(budget=16))  # default window min(32, 16 // 2) = 8
    assert ev.step_graph.notes["snapkv"]["settings"]["window"] == 8
    ids, mask = left_padded_batch(256, [30, 20], seed=3)
    _, _, state = decode_loop(ev, ids, mask, 0)
    kept = (state_of(ev, state, "key_positions0") >= 0).sum(-1)
    # both rows exceed the budget: each head keeps 8 selected + the shared 8-token window; the union is 16..24
    assert ((kept[:, 0] >= 16) & (kept[:, 0] <= 24)).all() and (kept == kept[:, :1]).all()
    assert "latent attention" in Streaming().applies_to(base.step_graph)
    from graphwright.verify import run_recipe

    with pytest.raises(RecipeError, match="latent attention"):
        run_recipe(base.step_graph, "streaming(window=8)", verify=False)
