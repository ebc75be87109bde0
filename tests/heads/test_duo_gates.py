import pytest
import torch

import graphwright as gw
from graphwright.heads.duo_gates import (
    ATTN_NAME,
    _final_hidden,
    _Mixer,
    _PromptCaches,
    fit_gates,
    lr_at,
    passkey_samples,
    ruler_samples,
    select_gates,
    stream_mask,
)
from graphwright.heads.retrieval_score import route_attention


def test_stream_mask_matches_the_loop():
    T, sink, recent = 12, 2, 3
    m = stream_mask(T, sink, recent)
    for i in range(T):
        for j in range(T):
            assert bool(m[i, j]) == (j <= i and (j < sink or i - j < recent))


def test_schedule_warms_up_holds_and_decays_to_a_floor():
    lrs = [lr_at(s, 10, 0.02) for s in range(10)]
    assert lrs == pytest.approx([0.01, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.01])
    assert lr_at(99, 100, 1.0) == pytest.approx(0.1)  # floor 0.1 lr (1/20 would be lower)


def test_thresholding_by_tau_and_by_target_sparsity():
    g = torch.tensor([[0.9, 0.2], [0.5, 0.7]])
    assert select_gates(g, tau=0.5) == {(0, 0), (1, 0), (1, 1)}
    assert select_gates(g, sparsity=0.5) == {(0, 0), (1, 1)}
    assert select_gates(g, sparsity=1.0) == frozenset()
    assert select_gates(g, sparsity=0.0) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    with pytest.raises(ValueError, match="exactly one of tau"):
        select_gates(g)


def test_token_passkey_samples_label_the_answer_segment():
    data = passkey_samples(None, 2, 64, seed=0, vocab_size=256)
    assert [d["input_ids"].shape for d in data] == [torch.Size([1, 64])] * 2
    assert all(int(d["labels"].sum()) == 3 * 7 and bool(d["labels"][-1]) and not bool(d["labels"][0]) for d in data)
    assert torch.equal(data[0]["input_ids"], passkey_samples(None, 2, 64, seed=0, vocab_size=256)[0]["input_ids"])
    with pytest.raises(ValueError, match="context must be an int >= 32"):
        passkey_samples(None, 1, 8, vocab_size=256)


@pytest.fixture(scope="module")
def model():
    return gw.load_model("tiny-llama")[0]


def test_gates_move_and_loss_falls(model):
    data = passkey_samples(None, 4, 64, seed=0, vocab_size=256)
    r = fit_gates(model, data, steps=40, sink=2, recent=8, lam=0.05, progress=False)
    assert r["mse"][0] < 1e-9  # all gates 1 = the dense model exactly
    assert (r["gates"] < 1.0).any() and r["gates"].min() >= 0.0
    assert sum(r["losses"][-5:]) / 5 < sum(r["losses"][:5]) / 5
    assert all(p.requires_grad for p in model.parameters())  # restored after fitting


def test_a_head_whose_stream_equals_full_is_gated_off(model):
    """KV head 1 of layer 0 gets zero values, so its streaming and full outputs are both 0: only the L1 term sees its gate."""
    v = model.model.layers[0].self_attn.v_proj
    d = v.out_features // 2
    saved = v.weight.detach().clone()
    with torch.no_grad():
        v.weight[d:] = 0
    try:
        data = passkey_samples(None, 4, 64, seed=0, vocab_size=256)
        r = fit_gates(model, data, steps=80, sink=2, recent=8, lam=0.05, progress=False)
    finally:
        with torch.no_grad():
            v.weight.copy_(saved)
    g = r["gates"]
    assert g[0, 1] < 0.05
    others = torch.cat([g[0, :1], g[1]])
    assert (others > g[0, 1] + 0.3).all(), g


def test_exact_streaming_gives_zero_mse_and_all_gates_fall(model):
    data = passkey_samples(None, 2, 48, seed=1, vocab_size=256)
    r = fit_gates(model, data, steps=60, sink=0, recent=48, lam=0.1, progress=False)
    assert max(r["mse"]) < 1e-9
    assert (r["gates"] < 0.1).all()


def test_sliding_window_models_are_refused():
    m = gw.load_model("tiny-mistral")[0]
    with pytest.raises(ValueError, match="supports full-attention models"):
        fit_gates(m, passkey_samples(None, 1, 40, vocab_size=256), steps=1, progress=False)


def test_answer_rows_over_the_cached_prompt_equal_a_whole_sequence_pass(model):
    """rows='answer': the prompt runs once, dense; the answer's rows mix over its cache. That equals one pass over the whole
    sequence in which the prompt rows attend fully and only the answer rows mix, for any gates; the cache is restored."""
    sample = passkey_samples(None, 1, 64, seed=0, vocab_size=256)[0]
    p = 64 - int(sample["labels"].sum())
    gates = torch.nn.Parameter(torch.rand(2, 2, generator=torch.Generator().manual_seed(3)))
    caches = _PromptCaches(model, [sample])
    with torch.no_grad(), route_attention(model, ATTN_NAME, _Mixer(gates, 2, 8)):
        got, again = caches.hidden(0), caches.hidden(0)
    whole = _Mixer(gates, 2, 8)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    whole._mask = torch.where(torch.arange(64)[:, None] < p, causal, stream_mask(64, 2, 8))  # prompt rows: full attention
    with torch.no_grad(), route_attention(model, ATTN_NAME, whole):
        want = _final_hidden(model, sample["input_ids"])[p:]
    assert got.shape == (64 - p, model.config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)
    with torch.no_grad(), route_attention(model, ATTN_NAME, _Mixer(torch.nn.Parameter(torch.zeros(2, 2)), 2, 8)):
        assert (caches.hidden(0) - got).abs().max() > 1e-3  # the gates do reach the answer rows


def test_answer_row_fit_moves_gates_and_is_exact_when_streaming_sees_everything(model):
    data = passkey_samples(None, 4, 64, seed=0, vocab_size=256)
    r = fit_gates(model, data, steps=40, sink=2, recent=8, lam=0.05, progress=False, rows="answer")
    assert r["mse"][0] < 1e-9 and (r["gates"] < 1.0).any()
    assert sum(r["losses"][-5:]) / 5 < sum(r["losses"][:5]) / 5
    assert all(p.requires_grad for p in model.parameters())
    exact = fit_gates(model, data[:2], steps=60, sink=0, recent=64, lam=0.1, progress=False, rows="answer")
    assert max(exact["mse"]) < 1e-9 and (exact["gates"] < 0.1).all()
    with pytest.raises(ValueError, match="rows must be one of"):
        fit_gates(model, data, steps=1, progress=False, rows="prompt")
    broken = dict(data[0], labels=data[0]["labels"].roll(-1))  # the answer no longer ends the sample
    with pytest.raises(ValueError, match="one run at its end"):
        fit_gates(model, [broken], steps=1, progress=False, rows="answer")


def test_ruler_samples_label_the_values_in_text_order():
    from transformers import AutoTokenizer

    from graphwright.models.smollm2 import converted_folder

    tok = AutoTokenizer.from_pretrained(converted_folder())
    data = ruler_samples(tok, 2, 600, seed=5)
    again = ruler_samples(tok, 2, 600, seed=5)
    assert torch.equal(data[1]["input_ids"], again[1]["input_ids"])
    for d in data:
        n = int(d["labels"].sum())
        assert bool(d["labels"][-n:].all()) and not bool(d["labels"][:-n].any())
        ids = d["input_ids"][0].tolist()
        prompt, answer = tok.decode(ids[:-n]), tok.decode(ids[-n:])
        values = [line.split(". ", 1)[1] for line in answer.split("\n\n", 1)[1].splitlines()]
        assert len(values) == 4 and answer.startswith(":\n\n1. ")
        assert [prompt.index(v) for v in values] == sorted(prompt.index(v) for v in values)
        assert all(f"is: {v}." in prompt for v in values)
        assert 450 < len(ids) <= 600
