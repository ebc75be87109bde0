"""snapkv(heads="adaptive") (Ada-KV) and snapkv(pyramid=beta) (PyramidKV) on the packed per-layer cache.

Exact settings (budget >= length, floor = 1, beta = 1), a slow loop oracle of the spec
(ALGORITHMS-2.md §3, §4), packed attention against dense attention under the boolean keep mask,
the bytes the runtime reports, and the refusals (h2o/fastgen adaptive).
"""

from __future__ import annotations

import math

import pytest
import torch

from graphwright import RecipeError
from graphwright.capture.ops import attention_reference
from graphwright.ops.adakv_ref import adakv_reference, pack_heads_reference, packed_positions_reference
from graphwright.passes.fastgen import FastGen
from graphwright.passes.h2o import H2O
from graphwright.passes.snapkv import SnapKV
from graphwright.runtime.generate import state_bytes
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import (
    assert_exact_setting,
    decode_loop,
    kept_after_prefill,
    kept_positions,
    probs_oracle,
    run_pass,
    state_of,
)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("extra", [dict(heads="adaptive", floor=0.0), dict(heads="adaptive", pyramid=20.0)])
def test_budget_at_least_length_is_identity(compiled_tiny, name, extra):
    cm = compiled_tiny(name)
    assert_exact_setting(cm, SnapKV(budget=12, window=4, **extra), 8, [12, 7])


@pytest.mark.parametrize("extra", [dict(heads="adaptive", floor=1.0), dict(pyramid=1.0), dict(heads="adaptive", floor=1.0, pyramid=1.0),
                                   dict(heads="adaptive", floor=1.0, split="kvpress")])
def test_floor_one_and_beta_one_equal_snapkv(compiled_tiny, extra):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, [20, 9], seed=2)
    layers = range(cm.step_graph.info.num_layers)
    ref = run_pass(cm, SnapKV(budget=8, window=3, kernel=3, pool="max"))
    got = run_pass(cm, SnapKV(budget=8, window=3, kernel=3, pool="max", **extra))
    want_logits, want_sets = kept_after_prefill(ref, ids, mask, layers)
    got_logits, got_sets = kept_after_prefill(got, ids, mask, layers)
    assert got_sets == want_sets
    assert (got_logits - want_logits).abs().max() <= 1e-4


def test_adaptive_heads_are_ragged_and_keep_the_layer_total(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, [40, 30], seed=3)
    ev = run_pass(cm, SnapKV(budget=10, window=2, heads="adaptive", floor=0.0))
    _, sets = kept_after_prefill(ev, ids, mask, range(cm.step_graph.info.num_layers))
    hk = cm.step_graph.info.num_kv_heads
    counts = [[len(h) for h in row] for layer in sets.values() for row in layer]
    # floor 0: sum over heads = Hk * budget exactly (each head keeps its share plus the window)
    assert all(sum(c) == hk * 10 for c in counts)
    assert any(len(set(c)) > 1 for c in counts)  # the split is not uniform somewhere


def test_kvpress_split_differs_from_the_official_safeguard():
    """One head holds all the mass (c = 224, w = 32: the 25% cell at 1,024 tokens): kvpress's split leaves the others
    int(0.2 * 256) - 32 = 19 prefix tokens, the official rule round(0.2 * 224) = 45; floor 0: both the global top-k."""
    from graphwright.ops.adakv_ref import adaptive_counts, kvpress_counts

    scores = torch.full((3, 1000), 1e-3)
    scores[0] = 1.0
    cand = torch.ones(3, 1000, dtype=torch.bool)
    assert kvpress_counts(scores, cand, 224, 0.2, 32) == [634, 19, 19]
    assert adaptive_counts(scores, cand, 224, 0.2) == [582, 45, 45]
    assert kvpress_counts(scores, cand, 224, 0.0, 32) == adaptive_counts(scores, cand, 224, 0.0) == [672, 0, 0]
    with pytest.raises(RecipeError, match="needs heads='adaptive'"):
        SnapKV(budget=8, split="kvpress")
    with pytest.raises(ValueError, match="split='x'; allowed: official, kvpress"):
        adakv_reference(*[torch.zeros(1, 1, 2, 2)] * 3, torch.zeros(1, 2, dtype=torch.long),
                        torch.zeros(1, 1, 2, dtype=torch.long), 1.0, 1, 1, 1, "avg", True, 0.2, 0, 1, 0.0, "x")


def _pyramid_c(c_mean, n, w, layer, L, beta):
    """PyramidKV's schedule in Python ints, written from the spec (ALGORITHMS-2.md §4)."""
    k_min = int(c_mean / beta)
    k_max = 2 * c_mean - k_min
    if k_max >= n - w:
        k_max, k_min = n - w, 2 * c_mean - (n - w)
    return k_max - layer * ((k_max - k_min) // (L - 1))


def _oracle(q, kd, q_pos, kpd, scale, budget, w, kernel, pool, adaptive, floor, layer, L, beta, split="official"):
    """Kept positions [B][Hk] by loops: scores, pooling, global sort, counts, safeguard, per-head top-n_h."""
    B, H, T, _ = q.shape
    hk = kd.shape[1]
    g = H // hk
    P = probs_oracle(q, kd, q_pos, kpd, scale)  # [B, H, T, S]
    out = []
    for b in range(B):
        n = int((q_pos[b] >= 0).sum())
        pos_slot = {int(kpd[b, 0, s]): s for s in range(T) if kpd[b, 0, s] >= 0}
        if n <= budget:
            out.append([sorted(pos_slot) for _ in range(hk)])
            continue
        prefix = n - w
        raw = [[sum(float(P[b, h * g + j, t, pos_slot[p]]) for j in range(g) for t in range(T - w, T)) / g
                for p in range(prefix)] for h in range(hk)]
        pooled = []
        for h in range(hk):
            row = []
            for p in range(prefix):
                win = [raw[h][x] if 0 <= x < prefix else 0.0 for x in range(p - kernel // 2, p + kernel // 2 + 1)]
                row.append(sum(win) / kernel if pool == "avg" else max(win))
            pooled.append(row)
        c = _pyramid_c(budget - w, n, w, layer, L, beta) if beta else budget - w
        if adaptive and split == "kvpress":  # kvpress AdaKVPress: window scored highest, forced top share, global top
            n_kept = c + w
            n_safe = max(1, int(n_kept * floor)) if floor > 0 else 0
            full = [[pooled[h][p] for p in range(prefix)] + [float("inf")] * w for h in range(hk)]
            forced = [set(sorted(range(n), key=lambda p: (-full[h][p], p))[:n_safe]) for h in range(hk)]
            entries = sorted((0 if p in forced[h] else 1, -full[h][p], h * n + p, h, p)
                             for h in range(hk) for p in range(n))[:hk * n_kept]
            counts = [sum(1 for e in entries if e[3] == h and e[4] < prefix) for h in range(hk)]
        elif adaptive:
            entries = sorted(((-pooled[h][p], h, p) for h in range(hk) for p in range(prefix)))[:hk * c]
            counts = [sum(1 for e in entries if e[1] == h) for h in range(hk)]
            counts = [math.floor((1 - floor) * x + floor * c + 0.5) for x in counts]
        else:
            counts = [c] * hk
        heads = []
        for h in range(hk):
            top = sorted(range(prefix), key=lambda p: (-pooled[h][p], p))[:counts[h]]
            heads.append(sorted(top + list(range(prefix, n))))
        out.append(heads)
    return out


@pytest.mark.parametrize("adaptive,floor,beta,layer,budget,split", [
    (True, 0.0, 0.0, 0, 11, "official"), (True, 0.3, 0.0, 1, 11, "official"), (True, 0.2, 3.0, 0, 11, "official"),
    (True, 0.2, 3.0, 2, 11, "official"), (False, 0.0, 2.0, 1, 11, "official"), (True, 0.5, 50.0, 2, 11, "official"),
    (True, 0.2, 20.0, 0, 16, "official"), (False, 0.0, 20.0, 2, 16, "official"),  # budget 16: k_max clamped to the prompt
    (True, 0.2, 0.0, 0, 11, "kvpress"), (True, 0.5, 0.0, 1, 11, "kvpress"), (True, 0.7, 0.0, 2, 16, "kvpress"),
    (True, 0.0, 0.0, 1, 11, "kvpress"), (True, 0.4, 3.0, 2, 11, "kvpress")])  # kvpress AdaKVPress's split
def test_kept_sets_match_the_loop_oracle(adaptive, floor, beta, layer, budget, split):
    g = torch.Generator().manual_seed(7 + layer)
    B, H, hk, T, D, pad = 2, 4, 2, 26, 8, (0, 5)
    q = torch.randn(B, H, T, D, generator=g) * 2
    kd = torch.randn(B, hk, T, D, generator=g)
    vd = torch.randn(B, hk, T, D, generator=g)
    q_pos = torch.stack([torch.arange(T) - p for p in pad]).clamp(min=-1)
    q_pos[1, :pad[1]] = -1
    w, kernel = 3, 3
    for pool in ("avg", "max"):
        k2, v2, kp2 = adakv_reference(q, pack_heads_reference(kd), pack_heads_reference(vd), q_pos,
                                      packed_positions_reference(q_pos, hk), 0.5, budget, w, kernel, pool, adaptive, floor,
                                      layer, 3, beta, split)
        want = _oracle(q, kd, q_pos, q_pos[:, None].expand(B, hk, T), 0.5, budget, w, kernel, pool, adaptive, floor,
                       layer, 3, beta, split)
        assert [[sorted(h) for h in row] for row in kept_positions(kp2)] == want
        assert k2.shape[2] == max(sum(len(h) for h in row) for row in want)  # the sum, not Hk x the longest head
        # every kept slot carries its own head's key
        for b in range(B):
            for s in range(k2.shape[2]):
                owners = (kp2[b, :, s] >= 0).nonzero().flatten().tolist()
                assert len(owners) <= 1
                if owners:
                    assert torch.equal(k2[b, 0, s], kd[b, owners[0], int(kp2[b, owners[0], s]) + pad[b]])


def test_packed_attention_equals_dense_under_the_keep_mask():
    g = torch.Generator().manual_seed(11)
    B, H, hk, T, D = 2, 6, 3, 30, 8
    q = torch.randn(B, H, T, D, generator=g) * 2
    kd, vd = torch.randn(B, hk, T, D, generator=g), torch.randn(B, hk, T, D, generator=g)
    q_pos = torch.arange(T).expand(B, T).clone()
    q_pos[1, :4] = -1
    q_pos[1, 4:] -= 4
    k2, v2, kp2 = adakv_reference(q, pack_heads_reference(kd), pack_heads_reference(vd), q_pos,
                                  packed_positions_reference(q_pos, hk), 0.4, 9, 2, 5, "avg", True, 0.1, 0, 2, 0.0)
    kept = kept_positions(kp2)
    mask_pos = q_pos[:, None].expand(B, hk, T).clone()
    for b in range(B):
        for h in range(hk):
            for s in range(T):
                if int(mask_pos[b, h, s]) not in kept[b][h]:
                    mask_pos[b, h, s] = -1
    qd = torch.randn(B, H, 1, D, generator=g)
    qp = q_pos[:, -1:] + 1
    got = attention_reference(qd, k2.expand(-1, hk, -1, -1), v2.expand(-1, hk, -1, -1), qp, kp2, 0.4)
    want = attention_reference(qd, kd, vd, qp, mask_pos, 0.4)
    assert (got - want).abs().max() <= 1e-5


def test_kv_bytes_are_the_slots_held(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    info = cm.step_graph.info
    ids, mask = left_padded_batch(256, [40, 25], seed=4)
    ev = run_pass(cm, SnapKV(budget=10, window=2, heads="adaptive", floor=0.0))
    _, _, state = decode_loop(ev, ids, mask, 3)
    specs = ev.step_graph.state
    want, padded = 0, 0
    for layer in range(info.num_layers):
        kp = state_of(ev, state, f"key_positions{layer}")
        per_head = (kp >= 0).sum(-1)  # [B, Hk]
        assert kp.shape[-1] == int(per_head.sum(-1).max())  # no slot beyond the longest row's total
        want += 2 * kp.shape[0] * kp.shape[-1] * info.head_dim * 4
        padded += 2 * kp.shape[0] * info.num_kv_heads * int(per_head.max()) * info.head_dim * 4
    assert state_bytes(state, specs) == want < padded
    ev.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    assert ev.last_stats["kv_bytes"] == want


def test_refusals():
    with pytest.raises(RecipeError, match="same kind"):  # h2o(heads='adaptive'): tests/passes/test_adakv_decode.py
        H2O(heavy=4, recent=0.1, heads="adaptive")
    with pytest.raises(RecipeError, match=r"fastgen\(heads='adaptive'\) is not supported"):
        FastGen(heads="adaptive")
    assert H2O(heads="uniform").heads == "uniform"  # ONNX export of the packed cache: tests/onnx/test_duo_packed_onnx.py


def test_latent_layers_are_refused():
    from graphwright.passes.base import PassContext
    from graphwright.passes.lowrank_kv import LowRankKV
    from tests.conftest import _compiled, _tiny

    sg = LowRankKV(keep=0.5).run(_compiled("tiny-llama").step_graph.copy(), PassContext(model=_tiny("tiny-llama")))
    with pytest.raises(RecipeError, match=r"layers \[0, 1\] hold a latent cache .*per-head budgets cannot free memory"):
        SnapKV(budget=8, heads="adaptive").run(sg, PassContext())
