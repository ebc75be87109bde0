"""Eviction recipes on the compiled backend (``codegen/torch/static_eviction.py``): static slot buffers in the decode step.

Invariant checked: the compiled backend decodes StreamingLLM, H2O (token counts) and SnapKV like
the torch backend (slot eviction, ``eviction_slots.py``): on a ragged left-padded batch of 2,
after the prefill and each of 45 decode steps with eviction at every step, the same position set
per (row, layer, KV head), logits within 1e-4, the same greedy tokens; the state's shapes stop
changing once the budget is reached; one compile per capacity bucket (none per step). By default
the decode graph runs eagerly (``compiler = lambda gm: gm``, about a second); the Inductor cases
compile C++ (minutes under load) and are ``slow``. Recipes without a fixed decode capacity are
refused with the reason.
"""

from __future__ import annotations

import pytest
import torch

from graphwright.codegen.torch.static_eviction import free_slot, head_slot_write, rope_cache_index_static
from graphwright.compiled import CompiledModel
from graphwright.ops.rope_index_ref import rope_cache_index_reference
from graphwright.verify import run_recipe
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, random_headset

LENGTHS, STEPS = [40, 31], 45
# recipe -> (capacity after the prefill, capacity buckets compiled); budgets 32 < the longer prompt
CASES = {"streaming(sinks=4, window=28)": (33, [33]),
         "h2o(heavy=16, recent=16)": (33, [33]),
         "snapkv(budget=24)": (256, [256])}  # appends at decode: the append-only buckets


def kept_sets(cm, state):
    names = [s.name for s in cm.runtime_graph.state]
    k_pos = [state[names.index(n)] for n in names if n.startswith("key_positions")]  # [B, Hk, S] per layer, or shared [B, S]
    return [[sorted(h) for row in kept_positions(p if p.dim() == 3 else p[:, None]) for h in row] for p in k_pos]


def run(cm, lengths=LENGTHS, steps=STEPS):
    """(logits, tokens, kept sets after every step, state shapes after every step, frames compiled)."""
    ids, mask = left_padded_batch(cm.info.vocab_size, lengths, seed=1)
    sets, shapes = [], []

    def on_step(i, state):
        sets.append(kept_sets(cm, state))
        shapes.append([tuple(t.shape) for t in state])

    frames = torch._dynamo.utils.counters["frames"]["ok"]
    logits, toks, _ = decode_loop(cm, ids, mask, steps, on_step)
    return logits, toks, sets, shapes, torch._dynamo.utils.counters["frames"]["ok"] - frames


def with_recipe(base, recipe, backend):
    """The session's captured tiny model (``compiled_tiny``) with ``recipe``, on ``backend`` (no re-capture)."""
    sg, _, _ = run_recipe(base.step_graph, recipe, verify=False)
    return CompiledModel(sg, recipe=recipe, backend=backend)


def compiled_and_torch(base, recipe, inductor):
    ref, cm = with_recipe(base, recipe, "torch"), with_recipe(base, recipe, "compiled")
    if not inductor:
        cm._backend_step.compiler = lambda gm: gm
    return cm, ref


def check_same_as_torch(cm, ref, lengths=LENGTHS):
    got, want = run(cm, lengths), run(ref, lengths)
    assert torch.equal(got[1], want[1])
    assert (got[0] - want[0]).abs().max() <= 1e-4
    assert got[2] == want[2]  # kept position sets per (layer, row, head), after every step
    return got


@pytest.mark.parametrize("inductor", [pytest.param(True, marks=pytest.mark.slow), False], ids=["inductor", "eager"])
@pytest.mark.parametrize("recipe", list(CASES))
def test_compiled_eviction_keeps_the_torch_backends_sets_and_logits(compiled_tiny, recipe, inductor):
    cm, ref = compiled_and_torch(compiled_tiny("tiny-llama"), recipe, inductor)
    logits, toks, sets, shapes, frames = check_same_as_torch(cm, ref)
    cap, buckets = CASES[recipe]
    if not recipe.startswith("snapkv"):  # every head holds its budget (32) after every decode step: eviction at each
        assert all(len(h) == 32 for step in sets[1:] for layer in step for h in layer)
    assert all(s == shapes[1] for s in shapes[1:]) and shapes[1][0][2] == cap  # decode states: constant shapes
    assert [c["capacity"] for c in cm._backend_step.compiles] == buckets
    assert frames == (1 if inductor else 0)  # one compile for all 45 steps
    ids, mask = left_padded_batch(cm.info.vocab_size, LENGTHS, seed=1)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=8), ref.generate(ids, attention_mask=mask, max_new_tokens=8))


def test_a_budget_above_the_prompt_grows_by_buckets_up_to_budget_plus_one_next_to_dense_layers(compiled_tiny):
    """Prompts 250/241, H2O budget 280 on layer 1 only: its states grow 256 -> 281 (the budget + 1, not the
    512 bucket) and stay; layer 0 (dense, shared positions) grows 256 -> 512 at the same step."""
    cm, ref = compiled_and_torch(compiled_tiny("tiny-llama"), "h2o(heavy=140, recent=140, layers=[1])", inductor=False)
    _, _, sets, shapes, _ = check_same_as_torch(cm, ref, lengths=[250, 241])
    names = [s.name for s in cm.runtime_graph.state]
    evicting, dense = names.index("key_positions1"), names.index("key_positions")
    assert [s[evicting][-1] for s in shapes[1:]] == [256] * 6 + [281] * (STEPS - 6)
    assert [s[dense][-1] for s in shapes[1:]] == [256] * 6 + [512] * (STEPS - 6)
    assert [c["capacity"] for c in cm._backend_step.compiles] == [256, 512]
    assert max(len(h) for h in sets[-1][1]) == 280  # layer 1 reached its budget: eviction in the last steps


@pytest.mark.parametrize("recipe, why", [
    ("lowrank_kv(keep=0.5) + h2o(heavy=8, recent=8)", r"its cache is not a per-head state input .* latent cache"),
    ("lowrank_kv(keep=0.5) + streaming(sinks=2, window=8)", r"its cache is not a per-head state input .* latent cache"),
])
def test_eviction_on_latent_caches_is_refused_with_the_reason(compiled_tiny, recipe, why):
    """(Fraction budgets and FastGen run in the eager fallback: ``test_compiled_fallback.py``.)"""
    with pytest.raises(ValueError, match=r"backend='compiled' cannot run this recipe: .*" + why + r".*eviction on lowrank_kv caches"):
        with_recipe(compiled_tiny("tiny-llama"), recipe, "compiled")


def test_free_slot_and_head_slot_write_fill_each_heads_first_empty_slot():
    k_pos = torch.tensor([[[0, -1, 2, -1], [-1, 5, 6, 7]], [[1, 2, 3, -1], [4, 5, -1, -1]]])
    slot = free_slot(k_pos)
    assert slot.tolist() == [[1, 0], [3, 2]]
    buf = torch.zeros(2, 2, 4, 3)
    new = torch.arange(12.0).view(2, 2, 1, 3)
    assert head_slot_write(buf, new, slot) is buf
    for b in range(2):
        for h in range(2):
            assert torch.equal(buf[b, h, slot[b, h]], new[b, h, 0])
            assert float(buf[b, h].abs().sum()) == float(new[b, h].abs().sum())  # nothing else written


def test_rope_by_rank_on_unordered_slots_equals_the_reference_on_the_ordered_cache():
    g = torch.Generator().manual_seed(0)
    B, H, Hk, S, D = 2, 4, 2, 7, 8
    k_pos = torch.tensor([[0, 1, 2, 5, 6, 9, -1], [3, 4, 7, 8, 11, 12, -1]]).view(B, 1, S).expand(B, Hk, S).contiguous()
    k_pos[..., -1] = torch.tensor([13, 14])[:, None]  # the new token: the latest position, last slot (the reference's layout)
    k = torch.randn(B, Hk, S, D, generator=g)
    q = torch.randn(B, H, 1, D, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    want_q, want_k = rope_cache_index_reference(q, k, k_pos, inv_freq, 1.0)
    perm = torch.tensor([6, 2, 0, 5, 1, 4, 3])  # the new token first, others shuffled, plus an empty slot
    k_pos_p = torch.cat([k_pos[..., perm], torch.full((B, Hk, 1), -1)], -1)
    k_p = torch.cat([k[:, :, perm], torch.randn(B, Hk, 1, D, generator=g)], 2)
    got_q, got_k = rope_cache_index_static(q, k_p, k_pos_p, inv_freq, 1.0)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k[:, :, :S], want_k[:, :, perm])


PACKED = ['snapkv(budget=24, window=4, heads="adaptive", floor=0.0)', "snapkv(budget=24, window=4, pyramid=20.0)", "scores"]


@pytest.mark.parametrize("inductor", [pytest.param(True, marks=pytest.mark.slow), False], ids=["inductor", "eager"])
@pytest.mark.parametrize("recipe", PACKED)
def test_packed_adakv_caches_compile_and_decode_like_the_torch_backend(compiled_tiny, recipe, inductor, tmp_path):
    """The packed caches that compress once append Hk slots per decode step to one shared buffer per layer
    (``static_cache.slots_per_step``): the same kept sets, logits and tokens as the torch backend; each buffer gets
    room for 256 steps at once (``compiled.PACKED_ROOM_STEPS``), so the layers' ragged lengths cost no recompiles."""
    base = compiled_tiny("tiny-llama")
    if recipe == "scores":
        path, _ = random_headset(base.step_graph.info, tmp_path, 3, zero_below=0.4)
        recipe = f'snapkv(budget=24, window=4, heads="scores", gamma=3.0, headset="{path}")'
    cm, ref = compiled_and_torch(base, recipe, inductor)
    _, _, sets, shapes, frames = check_same_as_torch(cm, ref)
    hk = base.step_graph.info.num_kv_heads
    names = [s.name for s in cm.runtime_graph.state]
    k0 = names.index("k0")  # layer 0's packed keys [B, 1, N, D]
    assert shapes[0][k0][1] == 1 and shapes[1][k0][1] == 1
    assert [len(h) for h in sets[-1][0]] == [n + STEPS for n in (len(h) for h in sets[0][0])]  # one slot per head and step
    assert cm._backend_step.grow[k0] == hk
    # room for PACKED_ROOM_STEPS (256) steps from the first decode step: the shapes never change over 45, one compile
    assert all(s == shapes[1] for s in shapes[1:]) and shapes[1][k0][2] >= shapes[0][k0][2] + hk * 256
    assert len(cm._backend_step.compiles) == 1 and frames == (1 if inductor else 0)


def test_adakv_resplit_at_every_decode_step_is_refused_with_the_reason(compiled_tiny):
    with pytest.raises(ValueError, match=r"cannot run this recipe: .*on a packed per-layer cache .* no static decode translation"):
        with_recipe(compiled_tiny("tiny-llama"), 'evict(score="h2o", rule="adaptive", budget=8, when="decode")', "compiled")


def test_packed_buffers_run_out_of_room_together(compiled_tiny, monkeypatch):
    """Room for 8 steps: every packed buffer is reallocated at the same steps (one compile key per reallocation, not one
    per layer crossing a bucket), and the decode still equals the torch backend's."""
    from graphwright.codegen.torch import compiled

    monkeypatch.setattr(compiled, "PACKED_ROOM_STEPS", 8)
    monkeypatch.setattr(compiled, "SMALL_GRANULE", 1)  # exact capacities: the reallocations are visible in the shapes
    cm, ref = compiled_and_torch(compiled_tiny("tiny-llama"), "snapkv(budget=24, window=4, pyramid=20.0)", inductor=False)
    _, _, _, shapes, _ = check_same_as_torch(cm, ref)
    names = [s.name for s in cm.runtime_graph.state]
    packed = [i for i, n in enumerate(names) if n.startswith(("k", "v"))]
    changed = [step for step in range(2, len(shapes)) if shapes[step] != shapes[step - 1]]
    assert changed and all(all(shapes[s][i] != shapes[s - 1][i] for i in packed) for s in changed)  # all at once
    assert len(cm._backend_step.compiles) == len(changed) + 1 <= STEPS // 8 + 1


def test_a_packed_cache_under_a_sliding_window_is_refused_with_the_reason(compiled_tiny):
    """tiny-gemma3's layer 0 has a native sliding window: the one-query packed attention has no window form."""
    with pytest.raises(ValueError, match=r"cannot run this recipe: .*packed cache with a window, sinks or key bias"):
        with_recipe(compiled_tiny("tiny-gemma3"), "snapkv(budget=10, window=2, heads='adaptive', floor=0.0)", "compiled")
