"""evict(..., rerotate=True) (kvpress KeyRerotationPress): a loop oracle on the HF model, the exact setting, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

import graphwright as gw
from graphwright import RecipeError
from graphwright.errors import GraphwrightError
from graphwright.passes.evict import Evict
from graphwright.runtime import positions_from_mask
from graphwright.runtime.score import score_stream
from tests.conftest import _compiled, _tiny, left_padded_batch
from tests.passes.eviction_helpers import run_pass, state_of

LENGTHS = [14, 9]  # batch 2, row 1 left-padded by 5
RECIPES = [dict(score="snapkv", budget=6, window=2), dict(score="finch", budget=0.5, window=3),
           dict(score="knorm", budget=5, sinks=1)]
GEN = dict(eos_token_id=[], pad_token_id=0)


@torch.inference_mode()
def kept_sets(cm, ids, mask):
    """[row][layer][head] sorted kept positions after the prompt step of ``cm`` (keys at their original positions)."""
    state = cm.runtime_graph.init_state(ids.shape[0])
    _, state = cm._step(ids, positions_from_mask(mask), torch.tensor([ids.shape[1] - 1]), state)
    layers = [state_of(cm, state, f"key_positions{layer}") for layer in range(cm.info.num_layers)]
    return [[[sorted(int(p) for p in head if p >= 0) for head in kp[b]] for kp in layers] for b in range(ids.shape[0])]


@torch.inference_mode()
def oracle(model, prompt, kept, feed, steps):
    """The HF model by hand: prefill ``prompt`` [T]; per layer and KV head keep the positions ``kept`` and rotate
    each kept key by (j - p) with HF's rotary table (j = its index among the kept); feed ``feed`` at positions
    n, n+1, ..., then ``steps`` greedy tokens. Returns (logits [len(feed) + steps + 1, V], greedy tokens)."""
    out = model(input_ids=prompt[None], use_cache=True)
    inv = model.model.rotary_emb.inv_freq.float()
    cache = DynamicCache()
    for layer, heads in enumerate(kept):
        k, v = out.past_key_values.layers[layer].keys[0], out.past_key_values.layers[layer].values[0]  # [Hk, T, D]
        idx = torch.tensor(heads)  # [Hk, n]: every head keeps the same count
        gather = idx[..., None].expand(-1, -1, k.shape[-1])
        k, v = k.gather(1, gather), v.gather(1, gather)
        freqs = (torch.arange(idx.shape[1]) - idx).float()[..., None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        cache.update((k * emb.cos() + rotate_half(k) * emb.sin())[None], v[None], layer)
    pos = len(kept[0][0])
    logits, toks = [out.logits[0, -1]], []
    for t in range(len(feed) + steps):
        tok = feed[t] if t < len(feed) else int(logits[-1].argmax())
        if t >= len(feed):
            toks.append(tok)
        step = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, position_ids=torch.tensor([[pos]]))
        logits.append(step.logits[0, -1])
        pos += 1
    return torch.stack(logits), toks


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r["score"])
def test_generate_equals_the_hf_loop_oracle(recipe):
    """Left-padded batch: each row's greedy tokens are the oracle's (its own n; keys re-rotated, decode from n)."""
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=21)
    plain, rerot = run_pass(cm, Evict(**recipe)), run_pass(cm, Evict(**recipe, rerotate=True))
    kept = kept_sets(plain, ids, mask)
    got = rerot.generate(ids, attention_mask=mask, max_new_tokens=8, **GEN)
    T = ids.shape[1]
    for b, L in enumerate(LENGTHS):
        assert len({len(h) for layer in kept[b] for h in layer}) == 1  # one count n per row
        assert len(kept[b][0][0]) < L  # something was evicted
        _, want = oracle(_tiny("tiny-llama"), ids[b, T - L:], kept[b], [], 8)
        assert got[b, T:].tolist() == want


@pytest.mark.parametrize("recipe", RECIPES[:2], ids=lambda r: r["score"])
def test_score_stream_logits_equal_the_oracle_and_differ_from_original_positions(recipe):
    """Teacher-forced continuation (score_stream): NLL within 1e-4 of the oracle's; keys left at their original
    positions give other values (the option changes the computation)."""
    cm = _compiled("tiny-llama")
    g = torch.Generator().manual_seed(22)
    prompt, feed = torch.randint(3, 256, (14,), generator=g), torch.randint(3, 256, (6,), generator=g).tolist()
    full = torch.cat([prompt, torch.tensor(feed)])
    plain, rerot = run_pass(cm, Evict(**recipe)), run_pass(cm, Evict(**recipe, rerotate=True))
    kept = kept_sets(plain, prompt[None], torch.ones(1, 14, dtype=torch.long))[0]
    logits, _ = oracle(_tiny("tiny-llama"), prompt, kept, feed, 0)
    want = -torch.log_softmax(logits[:-1].float(), -1).gather(-1, full[14:, None])[:, 0]
    got = score_stream(rerot, full, 14)[13:]
    assert (got - want).abs().max() <= 1e-4
    assert (score_stream(plain, full, 14)[13:] - got).abs().max() > 1e-3


def test_a_reusable_context_continues_at_n():
    """cm.prefill(context): next position n (the kept count); the question is fed at n, n+1, ... (the oracle)."""
    cm = run_pass(_compiled("tiny-llama"), Evict(score="snapkv", budget=6, window=2, rerotate=True))
    plain = run_pass(_compiled("tiny-llama"), Evict(score="snapkv", budget=6, window=2))
    g = torch.Generator().manual_seed(23)
    context, question = torch.randint(3, 256, (1, 15), generator=g), torch.randint(3, 256, (1, 3), generator=g)
    ctx = cm.prefill(context)
    assert ctx.next_positions.tolist() == [[6]]
    got = cm.generate(question, context=ctx, max_new_tokens=5, **GEN)
    kept = kept_sets(plain, context, torch.ones(1, 15, dtype=torch.long))[0]
    _, want = oracle(_tiny("tiny-llama"), context[0], kept, question[0].tolist(), 5)
    assert got[0, 3:].tolist() == want


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("recipe", [dict(score="snapkv", budget=1.0), dict(score="finch", budget=1.0, window=3),
                                    dict(score="knorm", budget=40)], ids=["snapkv", "finch", "knorm-count"])
def test_budget_at_least_the_length_is_a_no_op(name, recipe):
    """Exact setting: nothing evicted, positions 0..L-1, a rotation by 0: the logits of rerotate=False bit for bit
    (which are the dense model's within 1e-4), and the dense tokens."""
    cm = _compiled(name)
    ids, mask = left_padded_batch(256, LENGTHS, seed=24)
    plain, rerot = run_pass(cm, Evict(**recipe)), run_pass(cm, Evict(**recipe, rerotate=True))
    want = cm.generate(ids, attention_mask=mask, max_new_tokens=16, **GEN)
    assert torch.equal(rerot.generate(ids, attention_mask=mask, max_new_tokens=16, **GEN), want)
    full = want[0]  # row 0 is unpadded: teacher-force its generated tokens
    got = score_stream(rerot, full, 14)
    assert torch.equal(got, score_stream(plain, full, 14))
    assert (got - score_stream(cm, full, 14)).abs().max() <= 1e-4


@pytest.mark.parametrize("args,msg", [
    (dict(score="tova", budget=6), r"when='decode' evicts after the prompt step"),
    (dict(score="knorm", budget=6, when="every:4"), r"when='every' evicts after the prompt step"),
    (dict(score="snapkv", budget=8, rule="pyramid"), "rule='pyramid' gives layers different budgets"),
    (dict(score="snapkv", budget=8, rule="adaptive"), "rule='adaptive' gives heads different budgets"),
    (dict(score="knorm", budget=8, block=4), "block= evicts after every prompt block"),
    (dict(score="knorm", budget=8, layers=[0]), "layers= leaves other layers"),
    (dict(score="kvzip", budget=0.5), "that policy runs its own pass"),
    (dict(score="keyformer", budget=8), "that policy runs its own pass"),
])
def test_uneven_counts_and_decode_eviction_are_refused(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args, rerotate=True)


def test_emphasis_spans_are_refused_and_steering_without_them_runs():
    """Emphasis weights index prompt positions, which re-rotation renumbers: refused at generate; without emphasis a
    steered model is the base model (same tokens)."""
    model = _tiny("tiny-llama")
    alone = gw.compile(model, recipe="evict(score='knorm', budget=6, rerotate=True)")
    steered = gw.compile(model, recipe="evict(score='knorm', budget=6, rerotate=True) + steer(heads={0: [1]}, alpha=0.01)")
    ids, _ = left_padded_batch(256, [12], seed=25)
    assert torch.equal(steered.generate(ids, max_new_tokens=4, **GEN), alone.generate(ids, max_new_tokens=4, **GEN))
    with pytest.raises(ValueError, match="index prompt positions"):
        steered.generate(ids, emphasis=[(2, 6)], max_new_tokens=4, **GEN)


def test_kvzip_and_delegates_still_build_without_rerotate():
    assert Evict(score="keyformer", budget=8, rerotate=False).delegate is not None


def test_graph_level_refusals_backends_and_onnx():
    model = _tiny("tiny-llama")
    with pytest.raises(RecipeError, match="latent"):
        gw.compile(model, recipe="lowrank_kv(keep=0.5) + evict(score='knorm', budget=4, rerotate=True)")
    with pytest.raises(RecipeError, match="after duo"):
        gw.compile(model, recipe="duo(retrieval=[[0, 0]], sinks=2, window=4) + evict(score='knorm', budget=6, rerotate=True)")
    with pytest.raises(ValueError, match="owns its cache layout"):
        gw.compile(model, recipe="evict(score='knorm', budget=6, rerotate=True)", backend="compiled")
    cm = gw.compile(model, recipe="evict(score='knorm', budget=6, rerotate=True)")
    assert cm.step_graph.notes["rerotate"]["layers"] == list(range(cm.info.num_layers))
    with pytest.raises(GraphwrightError, match="rerotate=True\\) is not exported"):
        gw.export_onnx(cm, "/tmp/rerotate-never-written")
