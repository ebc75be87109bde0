"""evict(score=..., rule='adaptive'): Ada-KV head budgets for any per-head prefill scorer on the packed cache;
evict(score='keydiff', block=N): KeyDiff's block-wise prefill through the runtime."""

from __future__ import annotations

import pytest
import torch

from graphwright import RecipeError
from graphwright.capture.step_graph import positions_from_mask
from graphwright.ops.adakv_scored import EVICT_ADAKV_SCORED
from graphwright.passes.evict import Evict
from graphwright.passes.eviction_common import positions_name
from graphwright.passes.h2o import H2O
from graphwright.runtime.generate import prompt_blocks
from tests.conftest import _compiled, left_padded_batch
from tests.passes.eviction_helpers import decode_loop, run_pass, state_of
from tests.passes.test_evict_scorers import dense, kept_every_step


@pytest.mark.parametrize("score", ["knorm", "keydiff", "expected_attention", "chunkkv"])
def test_budget_at_least_length_is_the_identity(score):
    ids, mask, (want_logits, want) = dense("tiny-llama", steps=12)
    ev = run_pass(_compiled("tiny-llama"), Evict(score=score, budget=64, rule="adaptive"))
    assert any(n.target is EVICT_ADAKV_SCORED for n in ev.step_graph.gm.graph.nodes)
    logits, toks, _ = decode_loop(ev, ids, mask, 12)
    assert torch.equal(toks, want)
    assert (logits - want_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("score", ["knorm", "keydiff", "expected_attention"])
def test_heads_are_ragged_and_the_layer_keeps_its_total(score):
    cm = _compiled("tiny-llama")
    hk = cm.info.num_kv_heads
    ids, mask = left_padded_batch(256, [30, 24], seed=7)
    seen, _, toks = kept_every_step(run_pass(cm, Evict(score=score, budget=10, window=2, rule="adaptive", floor=0.0)),
                                    ids, mask, 3)
    ragged = False
    for layer in seen[0]:
        for row in layer:
            sizes = [len(h) for h in row]
            assert abs(sum(sizes) - hk * 10) <= hk  # Ada-KV keeps the layer's Hk * budget (rounding +- Hk)
            ragged |= len(set(sizes)) > 1
    assert ragged
    after = seen[-1]  # decode appends one token per head per step
    assert all(len(a) == len(p) + 3 for la, lp in zip(after, seen[0]) for ra, rp in zip(la, lp) for a, p in zip(ra, rp))
    uniform, _, _ = kept_every_step(run_pass(cm, Evict(score=score, budget=10, window=2, rule="adaptive", floor=1.0)),
                                    ids, mask, 0)
    assert all(len(h) == 10 for layer in uniform[0] for row in layer for h in row)


@pytest.mark.parametrize("args,msg", [
    (dict(score="tova", budget=6, when="prefill", rule="adaptive"), "same set"),
    (dict(score="h2o", budget=6, when="prefill", rule="adaptive"), "running per-slot state"),
    (dict(score="knorm", budget=6, when="decode", rule="adaptive"), "once, after prefill"),
])
def test_refusals(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)



def _kept(cm, state):
    return [[[sorted(int(p) for p in row if p >= 0) for row in heads] for heads in state_of(cm, state, positions_name(layer))]
            for layer in range(cm.info.num_layers)]


def test_keydiff_block_prefill_runs_the_prompt_in_blocks():
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, [19, 13], seed=8)
    ev = run_pass(cm, Evict(score="keydiff", block=4, budget=6, window=1))
    assert ev._runtime.prefill_chunk == 4
    ctx = ev.prefill(ids, mask)
    got = _kept(ev, ctx.state)
    # the block loop by hand: blocks of 4 from the prompt's end through the lowered step
    state = ev.runtime_graph.init_state(2)
    pos = positions_from_mask(mask)
    for a, b in prompt_blocks(ids.shape[1], 4):
        logits, state = ev._step(ids[:, a:b], pos[:, a:b], torch.tensor([b - a - 1]), state)
    assert got == _kept(ev, state)
    assert torch.equal(ctx.last_logits, logits[:, -1])
    assert all(len(h) == 6 for layer in got for row in layer for h in row)
    one_shot = run_pass(cm, Evict(score="keydiff", when="prefill", budget=6, window=1))
    assert _kept(one_shot, one_shot.prefill(ids, mask).state) != got  # block-wise is not one-shot scoring


def test_keydiff_block_with_budget_over_length_is_the_identity():
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, [19, 13], seed=9)
    ev = run_pass(cm, Evict(score="keydiff", block=4, budget=64))
    want = cm.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(ev.generate(ids, attention_mask=mask, max_new_tokens=12), want)
    diff = (ev._runtime.logits(ids, mask) - cm._runtime.logits(ids, mask)).abs().amax(-1)
    assert diff[mask.bool()].max() <= 1e-4  # every real prompt position (padding positions' logits are meaningless)


@pytest.mark.parametrize("args,msg", [
    (dict(score="snapkv", block=4, budget=6), "whole prompt's queries"),
    (dict(score="keydiff", block=4, budget=6, when="decode"), "prefill schedule"),
    (dict(score="knorm", block=4, budget=6, rule="adaptive"), "re-split block by block"),
])
def test_block_refusals(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)


@pytest.mark.parametrize("heavy,recent", [(0.25, 0.25), (0.3, 0.1)])
def test_h2o_fraction_setting_keeps_the_h2o_sets(heavy, recent):
    cm = _compiled("tiny-qwen2")
    ids, mask = left_padded_batch(256, [14, 9], seed=3)
    a = run_pass(cm, Evict(score="h2o", when="decode", budget=heavy + recent, window=recent))
    b = run_pass(cm, H2O(heavy=heavy, recent=recent))
    sa, la, ta = kept_every_step(a, ids, mask, 10)
    sb, lb, tb = kept_every_step(b, ids, mask, 10)
    assert sa == sb and torch.equal(ta, tb) and (la - lb).abs().max() <= 1e-5
    sizes = {len(h) for step in sa for layer in step for row in layer for h in row}
    assert len(sizes) > 2  # the budget grows with the length


@pytest.mark.parametrize("args,msg", [
    (dict(score="h2o", budget=8, window=0.25), "needs a fraction budget"),
    (dict(score="h2o", budget=0.2, window=0.25), "exceeds budget"),
    (dict(score="knorm", budget=0.5, window=0.2, rule="adaptive"), "fraction window is refused"),
])
def test_fraction_window_refusals(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)


def test_chunkkv_reuse_keeps_the_leader_layers_chunks():
    cm = _compiled("tiny-llama")  # 2 layers
    ids, mask = left_padded_batch(256, [30, 24], seed=10)
    args = dict(score="chunkkv", budget=9, chunk=2, window=1)
    own, lo, to = kept_every_step(run_pass(cm, Evict(**args)), ids, mask, 3)
    one, l1, t1 = kept_every_step(run_pass(cm, Evict(**args, chunk_reuse=1)), ids, mask, 3)
    assert own == one and torch.equal(lo, l1) and torch.equal(to, t1)  # reuse 1 = each layer selects its own
    assert own[0][0] != own[0][1]  # the layers pick different chunks on their own
    reused, _, _ = kept_every_step(run_pass(cm, Evict(**args, chunk_reuse=2)), ids, mask, 3)
    for step in reused:
        assert step[1] == step[0]  # layer 1 keeps exactly layer 0's positions, every step (decode appends to both)
    assert reused[0][0] == own[0][0]  # the leader selects as before
    assert all(len(h) <= 9 for row in reused[0][1] for h in row)


@pytest.mark.parametrize("args,msg", [
    (dict(score="knorm", budget=6, chunk_reuse=2), "ChunkKV's shared chunk set"),
    (dict(score="chunkkv", budget=6, chunk_heads="each", chunk_reuse=2), "chunk_heads='sum'"),
    (dict(score="knorm", chunk=2, budget=6, when="decode", chunk_reuse=2), "right after prefill"),
    (dict(score="chunkkv", budget=6, rule="pyramid", chunk_reuse=2), "different budgets"),
])
def test_chunk_reuse_refusals(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)
