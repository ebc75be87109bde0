"""Ada-KV head budgets at every decode step (``ops/adakv_decode.py``): h2o(heads='adaptive') and
evict(score='h2o'|'tova', when='decode', rule='adaptive') on the packed per-layer cache.

A slow loop oracle of the keep rule; floor = 1 equals the uniform per-head policy (kept sets and
logits, hundreds of steps, ragged batch of 2 left-padded); the torch backend (SDPA on the packed
view, in-place append) against the compacting reference backend over hundreds of steps; the layer
keeps its total while heads go ragged; identity at a budget >= the length; the refusals.
"""

from __future__ import annotations

import math

import pytest
import torch

from graphwright import RecipeError
from graphwright.compiled import CompiledModel
from graphwright.ops.adakv_decode import EVICT_ADAKV_DECODE, adakv_decode_reference, adaptive_decode_keep
from graphwright.passes.duo import Duo
from graphwright.passes.evict import Evict
from graphwright.passes.eviction_common import positions_name
from graphwright.passes.fastgen import FastGen
from graphwright.passes.h2o import H2O
from tests.conftest import _compiled, left_padded_batch
from tests.passes.eviction_helpers import COMPACTING, decode_loop, run_pass, state_of
from tests.passes.test_evict_scorers import dense, kept_every_step

LENGTHS = [30, 24]  # ragged batch of 2, left-padded


def _oracle(score, k_pos, length, budget_n, budget_f, sinks, window, window_f, floor):
    """The keep rule by python loops over (row, head, slot): per-head floors, then one global top-k."""
    B, hk, N = k_pos.shape
    keep = torch.zeros(B, hk, N, dtype=torch.bool)
    for b in range(B):
        L = int(length[b])
        win = window + math.floor(window_f * L + 1e-9)
        cap = budget_n + math.floor(budget_f * L + 1e-9) + math.floor(window_f * L + 1e-9)
        cand, c = {}, {}
        for h in range(hk):
            own = [j for j in range(N) if k_pos[b, h, j] >= 0]
            prot = [j for j in own if k_pos[b, h, j] < sinks or k_pos[b, h, j] >= L - win]
            for j in own:
                keep[b, h, j] = j in prot
            cand[h] = [j for j in own if j not in prot]
            c[h] = max(0, cap - len(prot))
        total = sum(c.values())
        if sum(len(x) for x in cand.values()) <= total:
            for h in range(hk):
                for j in cand[h]:
                    keep[b, h, j] = True
            continue
        rest = []
        for h in range(hk):
            ranked = sorted(cand[h], key=lambda j: (-float(score[b, 0, j]), j))
            f = min(len(ranked), math.floor(floor * c[h] + 0.5))
            for j in ranked[:f]:
                keep[b, h, j] = True
            rest += [(-float(score[b, 0, j]), h, j) for j in ranked[f:]]
            total -= f
        for _, h, j in sorted(rest)[:total]:
            keep[b, h, j] = True
    return keep


def _random_packed(seed, B=2, hk=3, per_head=(14, 9), pad=(0, 2)):
    """Random per-slot scores and a packed k_pos: head h's slots interleaved, ragged counts, left padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        slots = []
        for h in range(hk):
            n = per_head[b] + int(torch.randint(-3, 4, (1,), generator=g))
            pos = torch.sort(torch.randperm(per_head[b] * 2, generator=g)[:n]).values
            slots += [(h, int(p)) for p in pos]
        order = torch.randperm(len(slots), generator=g).tolist()
        rows.append([(-1, -1)] * pad[b] + [slots[i] for i in order])
    N = max(len(r) for r in rows)
    k_pos = torch.full((B, hk, N), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        for j, (h, p) in enumerate(r):
            if h >= 0:
                k_pos[b, h, j] = p
    length = torch.tensor([per_head[b] * 2 for b in range(B)])
    return torch.rand(B, 1, N, generator=g), k_pos, length


@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("budget", [(6, 0.0, 1, 2, 0.0), (0, 0.25, 0, 0, 0.1), (3, 0.0, 2, 0, 0.0), (40, 0.0, 0, 1, 0.0)])
def test_kept_sets_match_the_loop_oracle(floor, budget):
    for seed in range(4):
        score, k_pos, length = _random_packed(seed)
        args = (length, *budget[:2], budget[2], budget[3], budget[4], floor)
        got = adaptive_decode_keep(score, k_pos, *args)
        assert torch.equal(got, _oracle(score, k_pos, length, *budget, floor))


def test_floor_one_gives_every_head_its_own_top_c():
    score, k_pos, length = _random_packed(5)
    keep = adaptive_decode_keep(score, k_pos, length, 6, 0.0, 0, 2, 0.0, 1.0)
    for b in range(2):
        for h in range(3):
            own = k_pos[b, h] >= 0
            recent = own & (k_pos[b, h] >= int(length[b]) - 2)
            cand = own & ~recent
            want = torch.zeros_like(own)
            idx = torch.nonzero(cand).flatten()
            top = idx[torch.sort(score[b, 0, idx], descending=True, stable=True).indices[:6 - int(recent.sum())]]
            want[top] = True
            assert torch.equal(keep[b, h], want | recent)


def _packed_driver(scorer, steps, floor, budget_n=6, window=2, hk=2, H=4, D=8, prompt=12, seed=0):
    """Drive the op like the runtime (packed append of one token per head per step) with random q/k/v."""
    g = torch.Generator().manual_seed(seed)
    B = 2
    pad = [0, 3]
    k = torch.zeros(B, 1, 0, D)
    v = torch.zeros(B, 1, 0, D)
    k_pos = torch.zeros(B, hk, 0, dtype=torch.long)
    score = torch.zeros(B, 1, 0)
    pos = torch.arange(prompt).expand(B, prompt).clone()
    pos[1, :pad[1]] = -1
    pos[1, pad[1]:] = torch.arange(prompt - pad[1])
    sizes = []
    for _ in range(steps + 1):
        T = pos.shape[1]
        q = torch.randn(B, H, T, D, generator=g) * 2
        new_k, new_v = torch.randn(B, hk, T, D, generator=g), torch.randn(B, hk, T, D, generator=g)
        k = torch.cat([k, new_k.flatten(1, 2)[:, None]], 2)
        v = torch.cat([v, new_v.flatten(1, 2)[:, None]], 2)
        eye = torch.eye(hk, dtype=torch.bool)[None, :, :, None]
        newp = torch.where(eye, pos[:, None, None, :], torch.full_like(pos, -1)[:, None, None, :]).reshape(B, hk, hk * T)
        k_pos = torch.cat([k_pos, newp], 2)
        k, v, k_pos, score = adakv_decode_reference(q, k, v, pos, k_pos, score, 0.35, scorer, budget_n, 0.0, floor, 0,
                                                    window, 0.0)
        sizes.append((k_pos >= 0).sum(-1))
        pos = pos.max(dim=1, keepdim=True).values + 1
    return sizes, k_pos


@pytest.mark.parametrize("scorer,steps", [("h2o", 60), ("tova", 60),
                                          pytest.param("h2o", 300, marks=pytest.mark.slow),
                                          pytest.param("tova", 300, marks=pytest.mark.slow)])
def test_the_layer_keeps_its_total_every_step(scorer, steps):
    sizes, _ = _packed_driver(scorer, steps, floor=0.0)
    ragged = False
    for s in sizes:
        assert s.sum(-1).tolist() == [12, 12]  # Hk * budget, every step (the prompt of 12 / 9 real tokens fills it)
        ragged |= bool((s[:, 0] != s[:, 1]).any())
    assert ragged
    floored, _ = _packed_driver(scorer, steps, floor=0.5)
    assert all(int(s.min()) >= 2 + 2 for s in floored)  # window 2 + round(0.5 * 4) per head
    uniform, _ = _packed_driver(scorer, steps, floor=1.0)
    assert all(s.tolist() == [[6, 6], [6, 6]] for s in uniform)


STEPS = [40, pytest.param(200, marks=pytest.mark.slow)]  # hundreds of steps in the slow run (~2 min each, loaded)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("pair", [
    (dict(score="h2o", when="decode", budget=10, window=2, rule="adaptive", floor=1.0),
     dict(score="h2o", when="decode", budget=10, window=2)),
    (dict(heavy=0.25, recent=0.25, heads="adaptive", floor=1.0), dict(heavy=0.25, recent=0.25)),
])
def test_floor_one_equals_the_uniform_policy(name, pair, steps):
    cm = _compiled(name)
    ids, mask = left_padded_batch(256, LENGTHS, seed=7)
    make = Evict if "score" in pair[0] else H2O
    a = run_pass(cm, make(**pair[0]))
    assert any(n.target is EVICT_ADAKV_DECODE for n in a.step_graph.gm.graph.nodes)
    sa, la, ta = kept_every_step(a, ids, mask, steps)
    sb, lb, tb = kept_every_step(run_pass(cm, make(**pair[1])), ids, mask, steps)
    assert sa == sb
    assert torch.equal(ta, tb) and (la - lb).abs().max() <= 1e-4


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("recipe", [dict(score="h2o", budget=10, window=2, floor=0.2),
                                    dict(score="tova", budget=10, window=1, floor=0.0)])
def test_torch_backend_matches_the_compacting_reference(recipe, steps):
    cm = _compiled("tiny-qwen2")
    ids, mask = left_padded_batch(256, LENGTHS, seed=11)
    ev = run_pass(cm, Evict(when="decode", rule="adaptive", **recipe))
    ref = CompiledModel(ev.step_graph, backend=COMPACTING)
    assert ev.backend == "torch"
    sa, la, ta = kept_every_step(ev, ids, mask, steps)
    sb, lb, tb = kept_every_step(ref, ids, mask, steps)
    assert sa == sb and torch.equal(ta, tb) and (la - lb).abs().max() <= 1e-4
    hk = cm.info.num_kv_heads
    ragged = False
    for step in sa:
        for layer in step:
            for row in layer:
                assert sum(len(h) for h in row) == hk * 10  # the layer's total, every step
                ragged |= len({len(h) for h in row}) > 1
    assert ragged


@pytest.mark.parametrize("recipe", ["h2o", "tova"])
def test_budget_at_least_length_is_the_identity(recipe):
    ids, mask, (want_logits, want) = dense("tiny-llama", steps=24)
    ev = run_pass(_compiled("tiny-llama"), Evict(score=recipe, when="decode", budget=1.0, rule="adaptive", floor=0.0))
    logits, toks, _ = decode_loop(ev, ids, mask, 24)
    assert torch.equal(toks, want)
    assert (logits - want_logits).abs().max() <= 1e-4


def test_kv_bytes_are_the_slots_held():
    cm = _compiled("tiny-qwen2")
    ev = run_pass(cm, H2O(heavy=6, recent=2, heads="adaptive", floor=0.0))
    ids, mask = left_padded_batch(256, LENGTHS, seed=3)
    ev.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    info = cm.info
    _, _, state = decode_loop(ev, ids, mask, 5)
    slots = sum(state_of(ev, state, positions_name(layer)).shape[-1] for layer in range(info.num_layers))
    assert ev.last_stats["kv_bytes"] == 2 * 2 * slots * info.head_dim * 4  # B = 2, k and v, fp32, one packed row
    assert slots == info.num_layers * info.num_kv_heads * 8  # each row holds exactly Hk * (heavy + recent)


@pytest.mark.parametrize("make,msg", [
    (lambda: H2O(heavy=4, recent=0.1, heads="adaptive"), "same kind"),
    (lambda: H2O(heavy=4, recent=4, floor=0.5), "heads='adaptive' only"),
    (lambda: FastGen(heads="adaptive"), r"fastgen\(heads='adaptive'\) is not supported"),
    (lambda: Evict(score="tova", when="prefill", budget=6, rule="adaptive"), "same set"),
    (lambda: Evict(score="h2o", when="prefill", budget=6, rule="adaptive"), "when='decode'"),
    (lambda: Evict(score="h2o", when="every:4", budget=6, rule="adaptive"), "use when='decode'"),
    (lambda: Evict(score="h2o", when="decode", budget=6, rule="adaptive", chunk=2), "chunk="),
])
def test_refusals(make, msg):
    with pytest.raises(RecipeError, match=msg):
        make()


def test_after_duo_is_refused():
    cm = _compiled("tiny-llama")
    sg = Duo(retrieval=[[0, 0]], sinks=2, window=4).run(cm.step_graph.copy(), None)
    with pytest.raises(RecipeError, match="not implemented on duo's retrieval part"):
        Evict(score="h2o", when="decode", budget=6, rule="adaptive").run(sg, None)
