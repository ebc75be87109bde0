"""fastgen: exact at recovery 1.0, dense prefill, profiling math, local == sliding window, full heads keep all."""

from __future__ import annotations

import pytest
import torch

from graphwright.capture.ops import ATTENTION
from graphwright.compiled import CompiledModel
from graphwright.ops.eviction_ref import LADDER, PUNCT, SPECIAL
from graphwright.ops.fastgen_ref import fastgen_choose, fastgen_profile, fastgen_reference
from graphwright.passes.fastgen import FastGen, token_class_table
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import (
    assert_exact_setting,
    colsum_oracle,
    decode_loop,
    floor_budget,
    op_decode_loop,
    probs_oracle,
    run_pass,
    state_of,
    topk_oracle,
)
from tests.passes.test_eviction_ops import SCALE, prefill_step

LENGTHS = [12, 7]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_recovery_one_is_identity(compiled_tiny, name):
    cm = compiled_tiny(name)
    assert_exact_setting(cm, FastGen(recovery=1.0), 32, LENGTHS)


def test_recovered_mass_equals_independent_computation():
    q, k, v, q_pos, k_pos = prefill_step(lengths=(16, 11), seed=3)
    B, H, T, _ = q.shape
    Hk, g = k.shape[1], H // k.shape[1]
    cls = torch.randint(0, 3, (B, Hk, T), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    rec, _ = fastgen_profile(q, k, q_pos, k_pos, cls, SCALE, 0, 0.3, 0, 0.3)
    P = probs_oracle(q, k, q_pos, k_pos, SCALE)
    cs = colsum_oracle(q, k, q_pos, k_pos, SCALE)
    for b in range(B):
        n = int((q_pos[b] >= 0).sum())
        for h in range(Hk):
            valid = [s for s in range(T) if k_pos[b, h, s] >= 0]
            freq = set(topk_oracle(cs[b, h], valid, floor_budget(0.3, n)))
            w = floor_budget(0.3, n)
            for p in range(4):
                total = 0.0
                for t in range(T):
                    if q_pos[b, t] < 0:
                        continue
                    kept = {s for s in valid if cls[b, h, s] == SPECIAL or k_pos[b, h, s] == q_pos[b, t]
                            or (p >= 1 and cls[b, h, s] == PUNCT) or (p >= 2 and s in freq)
                            or (p >= 3 and 0 <= q_pos[b, t] - k_pos[b, h, s] <= w)}
                    total += sum(float(P[b, hq, t, s]) for hq in range(h * g, (h + 1) * g) for s in kept)
                assert abs(total / (n * g) - float(rec[b, h, p])) < 1e-5
    assert (rec[..., 4] == 1).all() and (rec[..., 1:] >= rec[..., :-1] - 1e-6).all()  # the ladder only adds


def test_choose_cheapest_policy_and_l1_rule():
    rec = torch.tensor([[[0.5, 0.93, 0.96, 0.99, 1.0], [0.2, 0.3, 0.4, 0.5, 1.0]]])
    assert fastgen_choose(rec, 0.95, "mass", "").tolist() == [[2, 4]]
    assert fastgen_choose(rec, 0.9, "l1", "").tolist() == [[2, 4]]  # l1: m >= (1 + 0.9) / 2 = 0.95
    assert fastgen_choose(rec, 0.5, "mass", "").tolist() == [[0, 3]]
    assert fastgen_choose(rec, 1.0, "mass", "").tolist() == [[4, 4]]
    assert fastgen_choose(rec, 0.5, "mass", "local").tolist() == [[3, 3]]


def test_first_token_equals_dense_while_evicting(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, [20, 9], seed=2)
    dense, _, _ = decode_loop(cm, ids, mask, 0)
    ev = run_pass(cm, FastGen(recovery=0.9))
    logits, _, state = decode_loop(ev, ids, mask, 0)
    assert torch.equal(logits[0], dense[0])
    kept = torch.stack([(state_of(ev, state, f"key_positions{i}") >= 0).sum(-1) for i in range(2)])
    # kept is [layer, row, kv head]: the 20-token row lost tokens somewhere, and no head holds more than its row
    assert int(kept[:, 0].min()) < 20
    assert int(kept[:, 0].max()) <= 20 and int(kept[:, 1].max()) <= 9


def test_forced_local_equals_sliding_window(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, [5, 3], seed=4)  # prompts shorter than the window: prefill is identical
    ev = run_pass(cm, FastGen(force="local", local=6, frequent=0))
    sg = cm.step_graph.copy()
    for node in sg.nodes(ATTENTION):  # a query sees itself + the 6 most recent cached tokens
        node.update_arg(6, 7) if len(node.args) > 6 else node.update_kwarg("window", 7)
    sg.gm.recompile()
    want_logits, want, _ = decode_loop(CompiledModel(sg), ids, mask, 30)
    got_logits, got, _ = decode_loop(ev, ids, mask, 30)
    assert torch.equal(got, want)
    assert (got_logits - want_logits).abs().max() <= 1e-4


def test_full_heads_never_evict_in_the_model(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=5)
    ev = run_pass(cm, FastGen(recovery=0.9))
    seen = set()

    def check(i, state):
        for layer in range(2):
            pol = state_of(ev, state, f"fastgen_policy{layer}")[..., 0]
            kept = (state_of(ev, state, f"key_positions{layer}") >= 0).sum(-1)
            real = torch.tensor(LENGTHS)[:, None] + i
            assert (kept[pol == 4] == real.expand_as(kept)[pol == 4]).all()
            assert (kept[pol < 4] <= real.expand_as(kept)[pol < 4]).all()
            seen.update(pol.flatten().tolist())

    decode_loop(ev, ids, mask, 12, on_step=check)
    assert 4 in seen and len(seen) > 1  # both full and lossy heads were exercised


def test_budgets_hold_over_500_steps():
    """Policy state given (decode path): head 0 full keeps everything, head 1 'frequent' keeps 0.3 L."""
    policy = torch.tensor([[[4], [2]]])

    def op(q, k, v, q_pos, k_pos, score, cls, pol):
        new_cls = torch.zeros(q_pos.shape, dtype=torch.int8)
        out = fastgen_reference(q, k, v, q_pos, k_pos, score, cls, new_cls, pol, SCALE, 0.95, 0, 0.3, 0, 0.3, "mass", "")
        return out

    def check(L, k_pos, extra):
        kept = (k_pos >= 0).sum(-1)[0]
        assert int(kept[0]) == L and int(kept[1]) == floor_budget(0.3, L)

    op_decode_loop(op, [torch.zeros(1, 2, 0), torch.zeros(1, 2, 0, dtype=torch.int8), policy], 500, on_step=check)


def test_token_class_table_from_tokenizer():
    class Tok:
        all_special_ids = [0, 1]
        vocab = ["<s>", "</s>", "hello", ".", " ,", "\n", "a.", "?!", "\ufffd"]

        def __len__(self):
            return len(self.vocab)

        def batch_decode(self, seqs):
            return [self.vocab[s[0]] for s in seqs]

    table = token_class_table(Tok(), 12)
    assert table.tolist() == [SPECIAL, SPECIAL, 0, PUNCT, PUNCT, PUNCT, 0, PUNCT, 0, 0, 0, 0]
    assert token_class_table(None, 4).tolist() == [0, 0, 0, 0]
    assert LADDER == ("special", "punct", "frequent", "local", "full")


@pytest.mark.slow
def test_smollm2_profiles_real_heads():
    """On the real model: tokenizer-derived sets, dense first token, lossy heads really shrink, full heads never do."""
    import graphwright as gw
    from graphwright.eval.data import read_text
    from graphwright.eval.perplexity import encode_text

    model, tok = gw.load_model("smollm2-135m")
    dense = gw.compile(model, tokenizer=tok, verify=False)
    ev = run_pass(dense, FastGen(recovery=0.9), tokenizer=tok)
    counts = ev.step_graph.notes["fastgen"]["counts"]
    assert counts["special_ids"] >= 2 and counts["punct_ids"] > 50  # from the real tokenizer
    ids = encode_text(tok, read_text(), 160)
    want_logits, want, _ = decode_loop(dense, ids, torch.ones_like(ids), 4)
    pols, kept = [], []

    def check(i, state):
        for layer in range(ev.info.num_layers):
            pol = state_of(ev, state, f"fastgen_policy{layer}")[0, :, 0]
            n = (state_of(ev, state, f"key_positions{layer}") >= 0).sum(-1)[0]
            assert (n[pol == 4] == 160 + i).all() and (n <= 160 + i).all()
            pols.extend(pol.tolist())
            kept.append(float(n.float().mean()) / (160 + i))

    logits, got, _ = decode_loop(ev, ids, torch.ones_like(ids), 4, on_step=check)
    assert torch.equal(logits[0], want_logits[0])  # prefill is dense
    assert len(set(pols)) >= 2 and min(pols) < 4  # real heads pick different, lossy policies
    assert sum(kept) / len(kept) < 0.9  # and the cache really shrinks


def test_report_shows_calibration_policies(compiled_tiny):
    from graphwright.passes.base import PassContext

    cm = compiled_tiny("tiny-llama")
    ids, _ = left_padded_batch(256, [40], seed=6)
    sg = FastGen(recovery=0.9).run(cm.step_graph.copy(), PassContext(calibration_ids=ids))
    note = sg.notes["fastgen"]
    calib = {k: v for k, v in note["counts"].items() if k.startswith("calib_")}
    assert sum(calib.values()) == cm.info.num_layers * cm.info.num_kv_heads
    per = [note["per_layer"][layer]["calib_policies"].split(",") for layer in range(cm.info.num_layers)]
    assert all(len(p) == cm.info.num_kv_heads and set(p) <= set(LADDER) for p in per)
    assert "calib_policies=" in str(CompiledModel(sg).report())
