"""lowrank_kv (LoRC): exact at full rank, value paths agree, SVD error, rank schedule, cache bytes."""

from __future__ import annotations

import functools

import pytest
import torch

import graphwright as gw
from graphwright import RecipeError
from graphwright.capture.ops import attention_reference
from graphwright.compiled import CompiledModel
from graphwright.ops.latent_attention import LATENT_ATTENTION, latent_attention_reference, rope_keys
from graphwright.passes.base import PassContext
from graphwright.passes.lowrank_kv import LowRankKV
from graphwright.passes.lowrank_ranks import allocate_ranks
from tests.conftest import _compiled, _tiny, left_padded_batch

FOUR = ("tiny-llama", "tiny-phi3", "tiny-qwen2", "tiny-mistral")


@functools.lru_cache(maxsize=None)
def _model(name):
    if name == "llama-6":  # >= 4 layers so the progressive schedule has a shape to check
        import transformers as tf

        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return _tiny(name)


@functools.lru_cache(maxsize=None)
def _captured(name):
    # the identity compile is shared with the rest of the suite (conftest caches it): capture once
    return gw.capture(_model(name)) if name == "llama-6" else _compiled(name).step_graph


def lowrank(name, backend="torch", **kw):
    sg = LowRankKV(**kw).run(_captured(name).copy(), PassContext(model=_model(name)))
    return CompiledModel(sg, backend=backend)


def _batch():
    return left_padded_batch(256, [10, 6], seed=4)  # batch 2, row 1 left-padded by 4


@pytest.mark.parametrize("name", FOUR)
def test_full_rank_reproduces_identity(name):
    ident, cm = _compiled(name), lowrank(name, keep=1.0)
    ids, mask = _batch()
    real = mask.bool()
    diff = (ident.logits(ids, mask) - cm.logits(ids, mask)).abs()[real].max().item()
    assert diff <= 1e-4, diff
    a = ident.generate(ids, 32, attention_mask=mask, eos_token_id=[])
    b = cm.generate(ids, 32, attention_mask=mask, eos_token_id=[])
    assert torch.equal(a, b)
    notes = cm.step_graph.notes["lowrank_kv"]
    assert all(v["sigma_k_next"] == 0.0 and v["sigma_v_next"] == 0.0 for v in notes["per_layer"].values())
    assert notes["counts"]["attention_rewritten"] == cm.info.num_layers
    assert not cm.step_graph.nodes(torch.ops.graphwright.attention.default)
    st = cm.last_stats
    if any(cm.info.windows or ()):  # native sliding layers: a latent cache is not bounded by the window (README)
        assert st["kv_bytes"] == cm.info.dense_kv_bytes_per_token() * b.shape[0] * (b.shape[1] - 1) > st["kv_bytes_dense"]
    else:
        assert st["kv_fraction"] == pytest.approx(1.0)
    if name == "tiny-phi3":  # fused qkv_proj keeps only its q rows once k/v moved to the latent path
        assert cm.graph.get_parameter("gw_lowrank_l0_q_proj").shape[0] == cm.info.num_heads * cm.info.head_dim


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-phi3"])
def test_absorbed_and_reconstruct_agree(name):
    ids, mask = _batch()
    real = mask.bool()
    outs = {(vp, be): lowrank(name, backend=be, keep=0.4, value_path=vp).logits(ids, mask)
            for vp in ("absorbed", "reconstruct") for be in ("reference", "torch")}
    base = outs["reconstruct", "reference"]
    for key, out in outs.items():
        assert (out - base).abs()[real].max().item() <= 1e-4, key
    ident = _compiled(name).logits(ids, mask)
    assert (ident - base).abs()[real].max().item() > 1e-3  # keep=0.4 really is lossy


def test_spectral_error_is_next_singular_value():
    cm = lowrank("tiny-llama", keep=0.5, schedule="uniform", scaling="none")
    notes = cm.step_graph.notes["lowrank_kv"]["per_layer"]
    w = _model("tiny-llama").model.layers[1].self_attn.k_proj.weight.detach().double()  # [H_kv*D, d]
    down = cm.graph.get_parameter("gw_lowrank_l1_k_down").double()  # A^T [r, d]
    up = cm.graph.get_parameter("gw_lowrank_l1_k_up").double()  # B [r, H_kv*D]
    r = notes[1]["r_k"]
    assert down.shape[0] == up.shape[0] == r < w.shape[0]
    err = torch.linalg.matrix_norm(w - (down.T @ up).T, ord=2).item()
    sigma = torch.linalg.svdvals(w)
    assert err == pytest.approx(sigma[r].item(), rel=1e-5)
    assert notes[1]["sigma_k_next"] == pytest.approx(sigma[r].item(), rel=1e-9)


def test_activation_scaling_is_asvd():
    """scaling="activation": W^T ~= diag(1/s) U_r S_r V_r^T from the SVD of diag(s) W^T, s = input RMS.

    Its spectral error is sigma_{r+1} of the scaled matrix, and on the calibration activations
    the keys it rebuilds are closer than plain SVD's at the same rank (what ASVD optimises).
    """
    from graphwright.passes.lowrank_calibrate import calibration_tokens, input_rms
    from graphwright.passes.lowrank_rewrite import lowrank_site

    sg = _captured("tiny-llama")
    site = sorted((lowrank_site(sg, n) for n in sg.nodes(torch.ops.graphwright.attention.default)),
                  key=lambda s: s.layer)[1]
    s = input_rms(sg, [site.proj.x], None)[site.proj.x]
    # independent RMS: the HF module's input on the same tokens
    got = {}
    hf = _model("tiny-llama")
    h = hf.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: got.setdefault("x", i[0]))
    with torch.no_grad():
        hf(calibration_tokens(sg, None))
    h.remove()
    assert torch.allclose(s, got["x"].double().reshape(-1, s.numel()).pow(2).mean(0).sqrt(), rtol=1e-5)

    act, plain = (lowrank("tiny-llama", keep=0.5, schedule="uniform", scaling=m) for m in ("activation", "none"))
    w = hf.model.layers[1].self_attn.k_proj.weight.detach().double()  # [H_kv*D, d]
    r = act.step_graph.notes["lowrank_kv"]["per_layer"][1]["r_k"]
    approx = {}
    for name, cm in (("act", act), ("plain", plain)):
        down = cm.graph.get_parameter("gw_lowrank_l1_k_down").double()
        up = cm.graph.get_parameter("gw_lowrank_l1_k_up").double()
        approx[name] = (down.T @ up).T
    sigma = torch.linalg.svdvals(w * s)
    err = torch.linalg.matrix_norm((w - approx["act"]) * s, ord=2).item()
    assert err == pytest.approx(sigma[r].item(), rel=1e-5)
    assert act.step_graph.notes["lowrank_kv"]["per_layer"][1]["sigma_k_next"] == pytest.approx(sigma[r].item(), rel=1e-6)
    x = got["x"].double().reshape(-1, s.numel())
    key_err = {k: (x @ (w - a).T).norm().item() for k, a in approx.items()}
    assert key_err["act"] < key_err["plain"], key_err
    full = lowrank("tiny-llama", keep=1.0, scaling="activation")
    ids, mask = _batch()
    assert (full.logits(ids, mask) - _compiled("tiny-llama").logits(ids, mask)).abs()[mask.bool()].max() <= 1e-4


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7])
def test_progressive_ranks_non_increasing(keep):
    cm = lowrank("llama-6", keep=keep)
    notes = cm.step_graph.notes["lowrank_kv"]
    per = [notes["per_layer"][i] for i in range(6)]
    for key in ("r_k", "r_v"):
        ranks = [p[key] for p in per]
        assert all(a >= b for a, b in zip(ranks, ranks[1:])), (key, ranks)
        assert ranks[0] > ranks[-1]  # shallow layers really keep more
    assert abs(notes["settings"]["realised_keep"] - keep) <= 0.01 * keep


@pytest.mark.parametrize("schedule", ["progressive", "uniform"])
@pytest.mark.parametrize("keep", [0.2, 0.35, 0.5, 0.8])
def test_realised_keep_within_one_percent(schedule, keep):
    cm = lowrank("tiny-llama", keep=keep, schedule=schedule)
    s = cm.step_graph.notes["lowrank_kv"]["settings"]
    # within 1% of the dense bytes; integer ranks round by at most 1/2 dim in 128 here
    assert abs(s["realised_keep"] - keep) <= 0.01 and abs(s["realised_keep"] - keep) <= 0.5 / 128
    if schedule == "uniform":
        r = [v["r_k"] for v in cm.step_graph.notes["lowrank_kv"]["per_layer"].values()]
        assert max(r) - min(r) <= 1


def test_rank_rule_on_many_layers():
    """30 layers of random spectra: budget met, bounds and monotonicity hold, K and V both tilt."""
    g = torch.Generator().manual_seed(0)
    sig = [torch.sort(torch.rand(192, generator=g, dtype=torch.float64) * (1 + i), descending=True).values for i in range(30)]
    for keep in (0.25, 0.5, 0.8, 1.0):
        plan = allocate_ranks(sig, sig[::-1], 192, 192, keep)
        assert abs(plan.realised_keep - keep) <= 0.01 * keep
        for ranks in (plan.r_k, plan.r_v):
            assert all(a >= b for a, b in zip(ranks, ranks[1:])) and min(ranks) >= 1 and max(ranks) <= 192
    assert allocate_ranks(sig, sig, 192, 192, 1.0).r_k == [192] * 30


def test_cache_bytes_equal_latent_widths():
    cm = lowrank("tiny-llama", keep=0.5)
    ids, mask = _batch()
    B, T = ids.shape
    cm.generate(ids, 9, attention_mask=mask, eos_token_id=[])
    S = T + 8  # the cache holds the prompt and every generated token but the last
    per = cm.step_graph.notes["lowrank_kv"]["per_layer"]
    dims = sum(v["r_k"] + v["r_v"] for v in per.values())
    assert cm.last_stats["kv_bytes"] == dims * B * S * 4
    info = cm.info
    planned = dims / (info.num_layers * 2 * info.num_kv_heads * info.head_dim)
    assert cm.last_stats["kv_bytes"] / cm.last_stats["kv_bytes_dense"] == pytest.approx(planned, rel=1e-12)
    for spec in cm.step_graph.state[1:]:
        assert spec.kind == "kv" and spec.seq_dim == 1 and spec.shape[:2] == (-1, 0)
    assert sum(spec.shape[2] for spec in cm.step_graph.state[1:]) == dims


def test_applies_once_and_composes_with_identity():
    from graphwright.verify import run_recipe

    sg = _captured("tiny-llama")
    done, _, ver = run_recipe(sg, "noop + lowrank_kv(keep=1.0)", model=_model("tiny-llama"))
    assert ver["passes"][1]["exact"] and ver["passes"][1]["max_abs_logit_diff"] <= 1e-4
    reason = LowRankKV(keep=0.5).applies_to(done)
    assert reason and "already" in reason
    with pytest.raises(RecipeError, match="lowrank_kv is in the recipe twice .*applies once"):
        run_recipe(sg, "lowrank_kv(keep=0.5) + lowrank_kv(keep=0.5)", model=_model("tiny-llama"))
    for n in done.nodes(LATENT_ATTENTION):
        assert n.meta["graphwright"]["variant"] == "lowrank" and n.meta["graphwright"]["op"] == "attention"
    done.gm.graph.lint()


def test_gpt2_fused_conv1d_qkv():
    """GPT-2: c_attn (Conv1D, fused q|k|v, learned positions, no RoPE) is sliced; full rank is exact."""
    assert LowRankKV().applies_to(_captured("tiny-gpt2")) is None
    ident, full = _compiled("tiny-gpt2"), lowrank("tiny-gpt2", keep=1.0)
    ids, mask = _batch()
    real = mask.bool()
    assert (ident.logits(ids, mask) - full.logits(ids, mask)).abs()[real].max().item() <= 1e-4
    assert torch.equal(ident.generate(ids, 16, attention_mask=mask, eos_token_id=[]),
                       full.generate(ids, 16, attention_mask=mask, eos_token_id=[]))
    outs = [lowrank("tiny-gpt2", keep=0.5, value_path=vp).logits(ids, mask) for vp in ("absorbed", "reconstruct")]
    assert (outs[0] - outs[1]).abs()[real].max().item() <= 1e-4
    assert (outs[0] - ident.logits(ids, mask)).abs()[real].max().item() > 1e-3


def test_per_layer_keep_all_ones_is_exact():
    """Exact setting of the per-layer form: keep=[1.0] * L is the full-rank rewrite (dense logits, same greedy tokens)."""
    ident = _compiled("tiny-llama")
    cm = lowrank("tiny-llama", keep=[1.0] * ident.info.num_layers)
    ids, mask = _batch()
    real = mask.bool()
    assert (ident.logits(ids, mask) - cm.logits(ids, mask)).abs()[real].max().item() <= 1e-4
    assert torch.equal(ident.generate(ids, 24, attention_mask=mask, eos_token_id=[]), cm.generate(ids, 24, attention_mask=mask, eos_token_id=[]))
    assert LowRankKV(keep=[1.0, 1.0]).is_identity() and not LowRankKV(keep=[1.0, 0.5]).is_identity()


def test_per_layer_keep_sets_each_layers_ranks_and_cache_bytes():
    keeps = [1.0, 0.75, 0.5, 0.3, 0.25, 0.1]  # not monotone on purpose: the caller chooses every layer
    keeps[2], keeps[3] = 0.3, 0.5
    sg = LowRankKV(keep=keeps, scaling="none").run(_captured("llama-6").copy(), PassContext(model=_model("llama-6")))
    notes = sg.notes["lowrank_kv"]
    width = 2 * 16  # num_key_value_heads * head_dim of llama-6, for K and for V
    assert [(v["r_k"], v["r_v"]) for _, v in sorted(notes["per_layer"].items())] == [(max(1, round(k * width)),) * 2 for k in keeps]
    assert notes["settings"]["schedule"] == "per_layer" and notes["settings"]["keep"] == keeps
    assert notes["per_layer"][0]["sigma_k_next"] == 0.0 and notes["per_layer"][5]["sigma_k_next"] > 0.0
    cm = CompiledModel(sg)
    ids, mask = _batch()
    cm.generate(ids, 5, attention_mask=mask, eos_token_id=[])
    planned = sum(max(1, round(k * width)) for k in keeps) / (len(keeps) * width)
    assert cm.last_stats["kv_bytes"] / cm.last_stats["kv_bytes_dense"] == pytest.approx(planned, rel=1e-12)


def test_per_layer_keep_refusals_name_the_problem():
    with pytest.raises(RecipeError, match="model has 2 attention layers"):
        lowrank("tiny-llama", keep=[0.5, 0.5, 0.5])
    with pytest.raises(RecipeError, match="schedule shape"):
        LowRankKV(keep=[0.5, 0.5], schedule="uniform")
    with pytest.raises(RecipeError, match="max_keep, min_keep shape"):
        LowRankKV(keep=[0.5, 0.5], min_keep=0.2, max_keep=0.8)
    for bad in ([], [0.5, 0.0], [0.5, 1.5], [0.5, "a"], [True]):
        with pytest.raises(RecipeError, match="per-layer keep must be a non-empty list of fractions in"):
            LowRankKV(keep=bad)


def test_refuses_bad_args():
    with pytest.raises(RecipeError):
        LowRankKV(keep=0.0)
    with pytest.raises(RecipeError, match="min_keep"):
        LowRankKV(keep=0.5, min_keep=0.6)
    with pytest.raises(RecipeError):
        LowRankKV(value_path="fold")


def _op_case(absorbed, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hk, T, S, D, rk, rv = 2, 4, 2, 3, 7, 8, 5, 6
    k_pos = torch.arange(S).expand(B, S).clone()
    k_pos[1, :2] = -1
    q_pos = k_pos[:, S - T:].clone()
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(B, H, T, D), r(B, S, rk), r(B, S, rv), r(rk, Hk * D), r(Hk * D) if bias else None,
            None if absorbed else r(rv, Hk * D), r(Hk * D) if bias and not absorbed else None,
            q_pos, k_pos, 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D), 1.0, D ** -0.5, 0)


@pytest.mark.parametrize("absorbed", [True, False])
def test_op_reference_fake_and_backend(absorbed):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from graphwright.codegen.torch.latent_attention import latent_attention_sdpa

    args = _op_case(absorbed, bias=True)
    out = torch.ops.graphwright.latent_attention(*args)
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = torch.ops.graphwright.latent_attention(*fargs)
    assert fake.shape == out.shape == (2, 4, 3, 6 if absorbed else 8)
    assert torch.allclose(latent_attention_sdpa(*args), out, atol=1e-5)
    # the definition written out: dense K (and V), rotated by transformers' own RoPE, then attention
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, c_k, c_v, k_up, k_b, v_up, v_b, q_pos, k_pos, inv_freq = args[:10]
    k = (c_k @ k_up + k_b).view(2, 7, 2, 8).transpose(1, 2)
    emb = torch.cat([k_pos.clamp(min=0)[..., None] * inv_freq] * 2, dim=-1)
    _, k_rot = apply_rotary_pos_emb(k, k, emb.cos(), emb.sin())
    v = c_v[:, None] if absorbed else (c_v @ v_up + v_b).view(2, 7, 2, 8).transpose(1, 2)
    want = attention_reference(q, k_rot, v, q_pos, k_pos, args[11])
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(rope_keys(k, k_pos, inv_freq, 1.0), k_rot, atol=1e-6)
    assert torch.equal(latent_attention_reference(*args), out)
