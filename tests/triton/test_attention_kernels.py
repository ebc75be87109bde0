"""Triton attention kernels (prefill and split-K decode) against ``attention_reference``, per variant."""

from __future__ import annotations

import pytest
import torch

from graphwright.capture.ops import attention_reference

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}  # max abs error vs the fp32 reference (outputs are O(1))


def _inputs(B, H, Hk, T, S, D, dtype, *, pad=0, per_head=False, bias=False, empty=0, seed=0, Dv=None):
    """Left-padded rows (``pad`` padding queries/keys in row 1), keys at positions 0..S-1 with the
    last T being the queries; ``empty`` slots per KV head set to -1 (an evicted cache)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, S, Dv or D, generator=g).to(dtype)
    k_pos = torch.arange(S).repeat(B, 1)
    if pad:
        k_pos[1] = torch.arange(S) - pad
        k_pos[1, :pad] = -1
    q_pos = k_pos[:, S - T:].clone()
    if per_head:
        k_pos = k_pos[:, None].repeat(1, Hk, 1)
        for h in range(Hk):  # a different set of evicted slots per KV head, never the query's own key
            idx = torch.randperm(S - T, generator=g)[:empty + h]
            k_pos[:, h, idx] = -1
    key_bias = torch.randn(B, H, S, generator=g).to(dtype) if bias else None
    return q, k, v, q_pos, k_pos, key_bias


VARIANTS = {  # name -> (kwargs for _inputs, window, sinks)
    "plain": (dict(), 0, 0),
    "padded": (dict(pad=5), 0, 0),
    "bias": (dict(bias=True, pad=3), 0, 0),
    "window": (dict(pad=2), 7, 0),
    "window_sinks": (dict(), 6, 3),
    "per_head": (dict(per_head=True, empty=4), 0, 0),
    "per_head_bias_window": (dict(per_head=True, empty=2, bias=True), 9, 2),
    "value_dim_differs": (dict(Dv=8, pad=1), 0, 0),
}


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_matches_reference(variant, dtype):
    from graphwright.codegen.triton.attention_prefill import attention_prefill

    kw, window, sinks = VARIANTS[variant]
    q, k, v, q_pos, k_pos, bias = _inputs(2, 2, 1, 20, 37, 16, dtype, **kw)
    ref = attention_reference(q.float(), k.float(), v.float(), q_pos, k_pos, 0.25, window,
                              None if bias is None else bias.float(), sinks).to(dtype)
    out = attention_prefill(q, k, v, q_pos, k_pos, 0.25, window, bias, sinks, block_m=16, block_n=16)
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_matches_reference(variant, dtype):
    from graphwright.codegen.triton.attention_decode import attention_decode

    kw, window, sinks = VARIANTS[variant]
    q, k, v, q_pos, k_pos, bias = _inputs(2, 6, 2, 1, 45, 16, dtype, **kw)
    ref = attention_reference(q.float(), k.float(), v.float(), q_pos, k_pos, 0.25, window,
                              None if bias is None else bias.float(), sinks).to(dtype)
    out = attention_decode(q, k, v, q_pos, k_pos, 0.25, window, bias, sinks, num_splits=3, block_n=16)
    _check(out, ref, dtype)


LATENT = {  # name -> (T, rope dims R of D=16 (0: no RoPE), k_bias, reconstruct V, v_bias, window[, extras])
    "absorbed_rope": (9, 16, False, False, False, 0),
    "reconstruct_bias_rope": (9, 16, True, True, True, 0),
    "partial_rotary_window": (9, 8, True, False, False, 5),
    "no_rope_reconstruct": (9, 0, False, True, False, 0),
    "decode_absorbed": (1, 16, True, False, False, 0),
    "decode_reconstruct": (1, 8, False, True, True, 4),
    # appended arguments: key_bias [B, H, S], sinks (with the window), k_norm [D] (RMSNorm before RoPE)
    "prefill_bias_sinks_knorm": (9, 12, True, False, False, 4, ("key_bias", "sinks", "k_norm")),
    "decode_bias_sinks_knorm": (1, 16, True, True, True, 5, ("key_bias", "sinks", "k_norm")),
    "knorm_no_rope": (9, 0, False, True, False, 0, ("k_norm",)),
    "decode_bias": (1, 8, False, False, False, 0, ("key_bias",)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", list(LATENT))
def test_latent_matches_reference(variant, dtype):
    from graphwright.codegen.triton.latent_attention import latent_attention_triton
    from graphwright.ops.latent_attention import latent_attention_reference

    T, R, kb, recon, vb, window, *more = LATENT[variant]
    more = more[0] if more else ()
    B, H, Hk, S, D, rk, rv = 2, 4, 2, 23, 16, 12, 10
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    c_k, c_v = torch.randn(B, S, rk, generator=g).to(dtype), torch.randn(B, S, rv, generator=g).to(dtype)
    k_up = (torch.randn(rk, Hk * D, generator=g) / rk ** 0.5).to(dtype)
    v_up = (torch.randn(rv, Hk * 8, generator=g) / rv ** 0.5).to(dtype) if recon else None
    k_bias = torch.randn(Hk * D, generator=g).to(dtype) if kb else None
    v_bias = torch.randn(Hk * 8, generator=g).to(dtype) if vb else None
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, R, 2).float() / R)) if R else None
    k_pos = torch.arange(S).repeat(B, 1)
    k_pos[1] = torch.arange(S) - 4
    k_pos[1, :4] = -1  # left padding in row 1
    q_pos = k_pos[:, S - T:].clone()
    args = (q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, 1.5, 0.25, window)
    if more:
        args += (torch.randn(B, H, S, generator=g).to(dtype) if "key_bias" in more else None,
                 3 if "sinks" in more else 0,
                 (1.0 + 0.3 * torch.randn(D, generator=g)).to(dtype) if "k_norm" in more else None, 1e-5)
    ref = latent_attention_reference(*args)
    out = latent_attention_triton(*args, block_r=16, block_n=16)
    _check(out, ref, dtype)


@pytest.mark.parametrize("T", [1, 6])
def test_latent_lowering_wrapper_forwards_appended_args(T):
    """The backend's table entry (``codegen.triton.latent_attention_triton``) passes key_bias, sinks and k_norm on."""
    from graphwright.codegen.triton import latent_attention_triton
    from graphwright.ops.latent_attention import latent_attention_reference

    B, H, Hk, S, D, rk, rv = 2, 4, 2, 13, 16, 12, 10
    g = torch.Generator().manual_seed(7)
    k_pos = torch.arange(S).repeat(B, 1)
    k_pos[1, :3] = -1
    args = (torch.randn(B, H, T, D, generator=g), torch.randn(B, S, rk, generator=g),
            torch.randn(B, S, rv, generator=g),
            torch.randn(rk, Hk * D, generator=g) / rk ** 0.5, None, None, None, k_pos[:, S - T:].clone(), k_pos,
            1.0 / (100.0 ** (torch.arange(0, 12, 2).float() / 12)), 1.0, 0.25, 3,
            torch.randn(B, H, S, generator=g), 2, 1.0 + 0.3 * torch.randn(D, generator=g), 1e-5)
    ref = latent_attention_reference(*args)
    assert (ref - latent_attention_reference(*args[:13])).abs().max() > 1e-2  # the appended args matter here
    assert (latent_attention_triton(*args) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["quest", "moba"])
def test_block_sparse_decode_matches_reference(mode, dtype):
    from graphwright.codegen.triton.block_sparse import block_sparse_triton
    from graphwright.ops.block_sparse import block_sparse_reference

    q, k, v, q_pos, k_pos, _ = _inputs(2, 4, 2, 1, 40, 16, dtype, pad=6, seed=2)
    args = (q_pos, k_pos, 0.25, 4, 3, mode)  # 10 (row 1: 9) blocks of 4, keep 3: really sparse
    ref = block_sparse_reference(q.float(), k.float(), v.float(), *args).to(dtype)
    dense = attention_reference(q.float(), k.float(), v.float(), q_pos, k_pos, 0.25).to(dtype)
    assert (ref.float() - dense.float()).abs().max() > 10 * TOL[dtype]  # the selection matters
    _check(block_sparse_triton(q, k, v, *args), ref, dtype)
