"""``evict(score='kvzip')`` on the tiny models: replay scores against Hugging Face's eager attention, the packed
cache holding exactly the kept pairs, the exact setting, the compressed context, composition and refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import graphwright as gw
from graphwright import RecipeError
from graphwright.ops.scorers.kvzip import keep_sets
from graphwright.passes.kvzip import FIRST_PROMPT, LATER_PROMPT, replay_prompt
from tests.conftest import _tiny, left_padded_batch

N_CTX, CHUNK = 40, 16  # three replay chunks: [0, 16), [16, 32), [32, 40)
GEN = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0)


def context(n=N_CTX, seed=3):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def replay_ids(ids, lo, hi):
    """kvpress's replay ids for the chunk [lo, hi) of a byte-level context (no chat template: suffix '\\n')."""
    head = list(FIRST_PROMPT.encode()) if lo == 0 else list(LATER_PROMPT.encode()) + ids[lo - 8:lo]
    return head + [10] + ids[lo:hi]


def hf_oracle_scores(name, ids, sinks=4):
    """{layer: [Hk, n]}: a fresh HF model with eager attention prefills the context, then each chunk's replay runs
    on a copy of that cache with output_attentions; weights are renormalised over [sinks, chunk, replay] in a loop."""
    model = gw.load_model(name)[0]
    model.set_attn_implementation("eager")
    cfg = model.config
    H, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    g = H // hk
    n = len(ids)
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        scores = {layer: torch.zeros(hk, n) for layer in range(cfg.num_hidden_layers)}
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            rids = replay_ids(ids, lo, hi)
            out = model(input_ids=torch.tensor([rids]), past_key_values=copy.deepcopy(cache), output_attentions=True)
            allowed = [j for j in range(n + len(rids)) if j < min(sinks, lo) or lo <= j < hi or j >= n]
            for layer, att in enumerate(out.attentions):
                for h in range(H):
                    for t in range(len(rids)):
                        z = float(att[0, h, t, allowed].double().sum())
                        for j in range(lo, hi):
                            w = float(att[0, h, t, j]) / z
                            scores[layer][h // g, j] = max(float(scores[layer][h // g, j]), w)
    return scores


def prefill_state(cm, ids):
    rt = cm._runtime
    state = [s.empty(1, ids.device) for s in rt.specs]
    pos = torch.arange(ids.shape[1])[None]
    return rt.step(ids, pos, torch.tensor([ids.shape[1] - 1]), state)[1]


def held_positions(ctx_or_state, cm, layer):
    """[Hk] sorted position lists the packed cache of ``layer`` holds (row 0)."""
    name = f"key_positions{layer}"
    state = ctx_or_state.state if hasattr(ctx_or_state, "state") else ctx_or_state
    kp = state[[s.name for s in cm._runtime.specs].index(name)][0]
    return [sorted(int(p) for p in row if p >= 0) for row in kp]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_replay_scores_equal_hf_eager_oracle_and_the_cache_holds_the_kept_pairs(name):
    cm = gw.compile(_tiny(name), recipe=f"evict(score='kvzip', budget=0.5, chunk={CHUNK})")
    ids = context()
    replay = cm._runtime.after_prompt
    got, count = replay.row_scores(prefill_state(cm, ids), ids[0].tolist(), N_CTX)
    want = hf_oracle_scores(name, ids[0].tolist())
    assert count == sum(len(replay_ids(ids[0].tolist(), lo, min(lo + CHUNK, N_CTX))) for lo in range(0, N_CTX, CHUNK))
    for layer in want:
        assert torch.allclose(got[layer], want[layer], atol=2e-5), (layer, (got[layer] - want[layer]).abs().max())
        assert (got[layer] > 0).all()  # every position sits in one chunk
    # the compressed context holds exactly the global bottom-k complement of those scores
    ctx = cm.prefill(ids)
    sets = keep_sets([want[layer] for layer in sorted(want)], 4, 0, 0.5, False)
    kept = 0
    for layer, keep in zip(sorted(want), sets):
        held = held_positions(ctx, cm, layer)
        assert held == [sorted(keep[h].nonzero().flatten().tolist()) for h in range(keep.shape[0])]
        assert all(p in row for row in held for p in range(4))  # sinks
        kept += sum(len(r) for r in held)
    hk = cm.info.num_kv_heads
    total = cm.info.num_layers * hk * N_CTX
    assert kept == total - int(total * 0.5)
    assert cm.last_stats["kvzip"]["kept_fraction"] == pytest.approx(kept / total)
    # the bytes held are the pairs kept: k and v rows of head_dim floats per pair (the packed buffer)
    assert ctx.kv_bytes == kept * 2 * cm.info.head_dim * 4


def test_layerwise_keeps_the_same_count_per_layer_and_global_spreads():
    ids = context(seed=5)
    counts = {}
    for lw in (False, True):
        cm = gw.compile(_tiny("tiny-llama"), recipe=f"evict(score='kvzip', budget=0.25, chunk={CHUNK}, layerwise={lw})")
        ctx = cm.prefill(ids)
        counts[lw] = [sum(len(r) for r in held_positions(ctx, cm, layer)) for layer in range(cm.info.num_layers)]
    per_layer = 2 * N_CTX
    assert counts[True] == [per_layer - int(per_layer * 0.75)] * 2
    assert sum(counts[False]) == 2 * per_layer - int(2 * per_layer * 0.75)


def test_exact_budget_gives_dense_logits_tokens_and_contexts():
    dense = gw.compile(_tiny("tiny-llama"))
    cm = gw.compile(_tiny("tiny-llama"), recipe="evict(score='kvzip', budget=1.0)")
    ids, mask = left_padded_batch(256, (14, 9), seed=5)
    assert (cm.logits(ids, attention_mask=mask) - dense.logits(ids, attention_mask=mask))[mask.bool()].abs().max() <= 1e-5
    assert torch.equal(cm.generate(ids, attention_mask=mask, **GEN), dense.generate(ids, attention_mask=mask, **GEN))
    c, q = context(), torch.tensor([[50, 60, 70]])
    want = dense.generate(torch.cat([c, q], 1), **GEN)[:, N_CTX:]
    ctx = cm.prefill(c)
    assert cm.last_stats["kvzip"]["replay_tokens"] == 0
    assert torch.equal(cm.generate(q, context=ctx, **GEN), want)


def test_compress_once_ask_many_and_plain_prompts():
    dense = gw.compile(_tiny("tiny-llama"))
    cm = gw.compile(_tiny("tiny-llama"), recipe=f"evict(score='kvzip', budget=0.5, chunk={CHUNK})")
    c = context()
    ctx = cm.prefill(c)
    before = [t.clone() for t in ctx.state]
    q1, q2 = torch.tensor([[50, 60, 70]]), torch.tensor([[80, 90]])
    a1, a2 = cm.generate(q1, context=ctx, **GEN), cm.generate(q2, context=ctx, **GEN)
    assert torch.equal(cm.generate(q1, context=ctx, **GEN), a1) and a2.shape == (1, 2 + 6)
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.state))  # the context is never modified
    dense_ctx = dense.prefill(c)
    assert ctx.kv_bytes < 0.6 * dense_ctx.kv_bytes
    # a plain prompt (batch 2, left padded): the first token comes from the dense prompt step; each row compressed
    ids, mask = left_padded_batch(256, (30, 21), seed=7)
    out = cm.generate(ids, attention_mask=mask, **GEN)
    want = dense.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(out[:, ids.shape[1]], want[:, ids.shape[1]])
    kept = cm.last_stats["kept_tokens_per_head"]
    # after the 5 decode steps each row holds its kept share plus the fed-back tokens
    for b, n in enumerate((30, 21)):
        total = sum(sum(layer[b]) for layer in kept)
        steps = 5 * cm.info.num_layers * cm.info.num_kv_heads
        assert total - steps == 2 * 2 * n - int(2 * 2 * n * 0.5)


def test_composition_with_steer():
    alone = gw.compile(_tiny("tiny-llama"), recipe=f"evict(score='kvzip', budget=0.5, chunk={CHUNK})")
    steered = gw.compile(_tiny("tiny-llama"),
                         recipe=f"evict(score='kvzip', budget=0.5, chunk={CHUNK}) + steer(heads={{0: [1]}}, alpha=0.01)")
    ids = context()
    assert torch.equal(steered.generate(ids, **GEN), alone.generate(ids, **GEN))  # no emphasis: steering adds nothing
    with pytest.raises(ValueError, match="cannot be combined with evict"):
        steered.generate(ids, emphasis=[(2, 6)], **GEN)


LOWRANK = "lowrank_kv(keep=0.5)"


def latent_rows(cm, state, layer):
    """(c_k, c_v) [S, r] the latent cache of ``layer`` holds (row 0)."""
    row = next(r for r in cm.step_graph.notes["kvzip"]["layers"] if r[0] == layer)
    names = [s.name for s in cm._runtime.specs]
    return state[names.index(row[1])][0], state[names.index(row[2])][0]


def test_lowrank_full_rank_latent_replay_scores_equal_hf_eager_oracle():
    """At full rank the latent keys are the dense keys: the latent layers' per-head replay scores equal HF's."""
    cm = gw.compile(_tiny("tiny-llama"), recipe=f"lowrank_kv(keep=1.0) + evict(score='kvzip', budget=0.5, chunk={CHUNK})")
    assert cm.step_graph.notes["kvzip"]["latent"] == [0, 1]
    ids = context()
    got, _ = cm._runtime.after_prompt.row_scores(prefill_state(cm, ids), ids[0].tolist(), N_CTX)
    want = hf_oracle_scores("tiny-llama", ids[0].tolist())
    for layer in want:
        assert torch.allclose(got[layer], want[layer], atol=1e-4), (layer, (got[layer] - want[layer]).abs().max())


def test_lowrank_then_kvzip_drops_the_pooled_bottom_tokens_from_the_latent_cache():
    cm = gw.compile(_tiny("tiny-llama"), recipe=f"{LOWRANK} + evict(score='kvzip', budget=0.5, chunk={CHUNK})")
    ids = context()
    full = prefill_state(cm, ids)
    scores, _ = cm._runtime.after_prompt.row_scores(full, ids[0].tolist(), N_CTX)
    scores = {layer: s.detach() for layer, s in scores.items()}
    hk, layers = cm.info.num_kv_heads, [0, 1]
    # oracle: a loop over each latent layer's heads, max per token, then the global bottom-k over tokens
    pooled = [torch.tensor([[max(float(scores[layer][h, j]) for h in range(hk)) for j in range(N_CTX)]])
              for layer in layers]
    sets = keep_sets(pooled, 4, 0, 0.5, False)
    ctx = cm.prefill(ids)
    kept, want_bytes = 0, 0
    per_layer = cm.step_graph.notes["lowrank_kv"]["per_layer"]
    for layer, keep in zip(layers, sets):
        want = keep[0].nonzero().flatten().tolist()
        assert held_positions(ctx, cm, layer) == [want] * hk  # every head holds the same (shared) rows
        c_k, c_v = latent_rows(cm, ctx.state, layer)
        d_k, d_v = latent_rows(cm, full, layer)
        assert torch.equal(c_k, d_k[want]) and torch.equal(c_v, d_v[want])  # the kept latent rows, unchanged
        kept += len(want)
        want_bytes += len(want) * (per_layer[layer]["r_k"] + per_layer[layer]["r_v"]) * 4
    assert kept == 2 * N_CTX - int(2 * N_CTX * 0.5)
    assert ctx.kv_bytes == want_bytes
    # tokens are the budget's unit, so the layer with more rank keeps more bytes; the latent cache still shrinks
    assert ctx.kv_bytes < 0.7 * gw.compile(_tiny("tiny-llama"), recipe=LOWRANK).prefill(ids).kv_bytes
    assert cm.last_stats["kvzip"]["kept_fraction"] == pytest.approx(kept / (2 * N_CTX))


def test_lowrank_kvzip_exact_budget_equals_lowrank_alone():
    lat = gw.compile(_tiny("tiny-llama"), recipe=LOWRANK)
    cm = gw.compile(_tiny("tiny-llama"), recipe=f"{LOWRANK} + evict(score='kvzip', budget=1.0)")
    ids, mask = left_padded_batch(256, (14, 9), seed=5)
    assert (cm.logits(ids, attention_mask=mask) - lat.logits(ids, attention_mask=mask))[mask.bool()].abs().max() <= 1e-5
    assert torch.equal(cm.generate(ids, attention_mask=mask, **GEN), lat.generate(ids, attention_mask=mask, **GEN))
    c, q = context(), torch.tensor([[50, 60, 70]])
    assert torch.equal(cm.generate(q, context=cm.prefill(c), **GEN), lat.generate(torch.cat([c, q], 1), **GEN)[:, N_CTX:])


def test_lowrank_kvzip_context_and_two_questions_and_a_padded_batch():
    lat = gw.compile(_tiny("tiny-llama"), recipe=LOWRANK)
    cm = gw.compile(_tiny("tiny-llama"), recipe=f"{LOWRANK} + evict(score='kvzip', budget=0.5, chunk={CHUNK})")
    ctx = cm.prefill(context())
    before = [t.clone() for t in ctx.state]
    q1, q2 = torch.tensor([[50, 60, 70]]), torch.tensor([[80, 90]])
    a1, a2 = cm.generate(q1, context=ctx, **GEN), cm.generate(q2, context=ctx, **GEN)
    assert a1.shape == (1, 3 + 6) and a2.shape == (1, 2 + 6)
    assert torch.equal(cm.generate(q1, context=ctx, **GEN), a1)
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.state))  # the context is never modified
    # a plain prompt, batch 2, left padded: the first token comes from the latent prompt step; each row compressed
    ids, mask = left_padded_batch(256, (30, 21), seed=7)
    out = cm.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(out[:, ids.shape[1]], lat.generate(ids, attention_mask=mask, **GEN)[:, ids.shape[1]])
    kept = cm.last_stats["kept_tokens_per_head"]
    for b, n in enumerate((30, 21)):  # per layer and head the shared rows: n // 2 kept over 2 layers, + 5 decode
        total = sum(layer[b][0] for layer in kept)
        assert total - 5 * cm.info.num_layers == 2 * n - int(2 * n * 0.5)
        assert all(len(set(layer[b])) == 1 for layer in kept)  # equal across heads


def test_refusals_name_the_problem():
    with pytest.raises(RecipeError, match="layerwise"):
        gw.compile(_tiny("tiny-llama"), recipe="evict(score='snapkv', budget=8, layerwise=True)")
    with pytest.raises(RecipeError, match="runs when='prefill'"):
        gw.compile(_tiny("tiny-llama"), recipe="evict(score='kvzip', budget=0.5, when='decode')")
    with pytest.raises(RecipeError, match="does not read"):
        gw.compile(_tiny("tiny-llama"), recipe="evict(score='kvzip', budget=0.5, window=4)")
    with pytest.raises(RecipeError, match="needs the tokenizer"):
        replay_prompt(None, 49152)
    with pytest.raises(ValueError, match="compiled.*(cannot run this graph|owns its cache layout)"):
        gw.compile(_tiny("tiny-llama"), recipe="evict(score='kvzip', budget=0.5)", backend="compiled")
    with pytest.raises(ValueError, match="no context to replay"):
        gw.compile(_tiny("tiny-llama"), recipe="evict(score='kvzip', budget=0.5)",
                   tokenizer=_ChatBytes()).prefill(torch.tensor([[5, 6, 7]]))


class _ChatBytes:
    """A byte tokenizer with a chat template whose user prefix is longer than a 3-token context."""

    chat_template = "x"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, enable_thinking):
        return "<user>" + messages[0]["content"] + "</user><assistant>"


def test_replay_prompt_follows_the_chat_template():
    p = replay_prompt(_ChatBytes(), 256)
    assert p["prefix"] == len("<user>") and bytes(p["suffix"]) == b"</user><assistant>"
    assert bytes(p["first"]).decode() == FIRST_PROMPT and bytes(p["later"]).decode() == LATER_PROMPT
    assert replay_prompt(None, 256)["suffix"] == [10]


@pytest.mark.slow
def test_smollm2_replay_prompt_is_kvpress_chat_template_split():
    """On SmolLM2's tokenizer: the prefix is the system turn plus the user header, the suffix the assistant header."""
    from transformers import AutoTokenizer

    from graphwright.models.smollm2 import converted_folder

    tok = AutoTokenizer.from_pretrained(converted_folder())
    p = replay_prompt(tok, tok.vocab_size)
    head = tok.apply_chat_template([{"role": "user", "content": "@@MARK@@"}], add_generation_prompt=True, tokenize=False)
    assert tok.decode(p["suffix"]) == head.split("@@MARK@@")[-1]  # "<|im_end|>\n<|im_start|>assistant\n"
    assert p["prefix"] == len(tok(head.split("@@MARK@@")[0], add_special_tokens=False)["input_ids"]) > 4
    assert tok.decode(p["first"]) == FIRST_PROMPT
