import pytest
import torch

import graphwright as gw
from graphwright.heads.duo_gates import fit_gates, lr_at, passkey_samples, select_gates, stream_mask


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
