"""The torch backend's latent attention (decode path and prefill path) against ``latent_attention_reference``.

Random inputs, GQA 6/2, ragged ``k_pos``: row 1 left-padded (-1 slots first) with an evicted
hole (-1) in the middle. RoPE full / partial / none, each with k_bias, key_bias and k_norm off,
k_bias alone, key_bias + k_norm, and all three; both value modes (absorbed latents; reconstruct,
where the fast path applies v_up after attention); decode (T=1), a few queries (T=3) and prefill
(T=S=20 > DECODE_MAX_T: the SDPA path). Window with and without sinks, masked (short cache) and
with the visible-column gather (S > 2 * (window + sinks)); keys in blocks of 4; fp16 inputs. The
cos/sin table is checked against cos/sin computed directly, past its first size, and its
per-step memo against a changed ``k_pos`` of the same shape.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from graphwright.codegen.torch import rope_table
from graphwright.codegen.torch.latent_attention import DECODE_MAX_T, latent_attention_sdpa, latent_decode
from graphwright.ops.latent_attention import latent_attention_reference

B, H, HK, D, RK, RV, DV = 2, 6, 2, 16, 12, 10, 16


def make(T: int, S: int, rope: str = "partial", k_bias: bool = True, recon: bool = False, seed: int = 0,
         start: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    k_pos = torch.arange(S).repeat(B, 1) + start
    k_pos[1] = torch.arange(S) - 3 + start
    k_pos[1, :3] = -1
    k_pos[1, S // 2] = -1  # an evicted slot
    rot = {"full": D, "partial": 12, "none": 0}[rope]
    a = dict(
        q=torch.randn(B, H, T, D, generator=g), c_k=torch.randn(B, S, RK, generator=g),
        c_v=torch.randn(B, S, RV, generator=g), k_up=torch.randn(RK, HK * D, generator=g) / RK ** 0.5,
        k_bias=torch.randn(HK * D, generator=g) if k_bias else None,
        v_up=torch.randn(RV, HK * DV, generator=g) / RV ** 0.5 if recon else None,
        v_bias=torch.randn(HK * DV, generator=g) if recon else None,
        q_pos=k_pos[:, S - T:].clone(), k_pos=k_pos,
        inv_freq=1.0 / (100.0 ** (torch.arange(0, rot, 2).float() / rot)) if rot else None,
        rope_scaling=1.5, scale=0.3,
    )
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "inv_freq" else v
            for k, v in a.items()}


def extras(S: int, key_bias: bool, k_norm: bool, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    if key_bias:
        out["key_bias"] = torch.randn(B, H, S, generator=g)
    if k_norm:
        out["k_norm"] = 1.0 + 0.3 * torch.randn(D, generator=g)
        out["k_norm_eps"] = 1e-5
    return out


def check(a: dict, tol: float = 2e-5, **kw):
    ref = latent_attention_reference(*a.values(), **kw)
    out = latent_attention_sdpa(*a.values(), **kw)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("T,S", [(1, 13), (3, 13), (20, 20)], ids=["decode", "3-queries", "prefill"])
@pytest.mark.parametrize("recon", [False, True], ids=["absorbed", "reconstruct"])
def test_matches_reference(T, S, recon):
    assert (T > DECODE_MAX_T) == (T == 20)  # the prefill case really takes the SDPA path
    flags = ((False, False, False), (True, False, False), (False, True, True), (True, True, True))  # k_bias, key_bias, k_norm
    for rope, (k_bias, key_bias, k_norm) in itertools.product(("full", "partial", "none"), flags):
        a = make(T, S, rope, k_bias, recon)
        check(a, **extras(S, key_bias, k_norm))


@pytest.mark.parametrize("S", [13, 40], ids=["masked", "gathered-columns"])
@pytest.mark.parametrize("recon", [False, True], ids=["absorbed", "reconstruct"])
def test_window_and_sinks(S, recon):
    """S=40 > 2 * (5 + 2): one query attends over the gathered visible columns only."""
    for sinks, key_bias, k_norm in itertools.product((0, 2), (False, True), (False, True)):
        a = make(1, S, recon=recon, start=7)
        check(a, window=5, sinks=sinks, **extras(S, key_bias, k_norm))


def test_window_padding_query_sees_everything():
    """A padding query (q_pos = -1) sees every filled slot: no column gather, still the reference."""
    a = make(1, 40)
    a["q_pos"][1] = -1
    check(a, window=5, sinks=2)


def test_fp16_inputs():
    """fp16 q / latents / weights: the fast path computes in fp32 like the reference, output fp16."""
    for recon, T in itertools.product((False, True), (1, 20)):
        a = make(T, T if T > 1 else 13, recon=recon, dtype=torch.float16)
        check(a, tol=2e-3, **extras(a["c_k"].shape[1], True, True))


def test_long_positions_grow_the_table():
    """Positions past the first table size (4,096 rows) and the per-step memo on a changed k_pos."""
    rope_table.clear()
    a = make(1, 13, rope="full", start=5000)
    check(a)
    assert rope_table._TABLES and next(iter(rope_table._TABLES.values()))[0].shape[0] == 8192
    b = dict(a, k_pos=a["k_pos"] - 4990, q_pos=a["q_pos"] - 4990)  # same shape, new values: the memo must miss
    torch.testing.assert_close(latent_decode(*b.values()), latent_attention_reference(*b.values()), atol=2e-5, rtol=2e-5)


def test_cos_sin_equal_direct_evaluation():
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    k_pos = torch.tensor([[-1, 0, 1, 2047, 4095, 70000]])
    cos, sin = rope_table.rope_cos_sin(k_pos, inv_freq, 0.7)
    ang = k_pos.clamp(min=0).float()[..., None] * inv_freq
    torch.testing.assert_close(cos, ang.cos() * 0.7, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ang.sin() * 0.7, atol=1e-6, rtol=0)
    other = rope_table.rope_cos_sin(k_pos, inv_freq * 0.5, 0.7)[0]  # another table of the same size
    torch.testing.assert_close(other, (ang * 0.5).cos() * 0.7, atol=1e-6, rtol=0)


@pytest.mark.parametrize("recon", [False, True], ids=["absorbed", "reconstruct"])
def test_key_blocks(monkeypatch, recon):
    """Keys rebuilt in blocks of 4 (13 and 40 columns: a partial last block), scores written per block."""
    from graphwright.codegen.torch import latent_attention as fast
    monkeypatch.setattr(fast, "KEY_BLOCK", 4)
    for (T, S), key_bias, k_norm in itertools.product(((1, 13), (3, 13), (1, 40)), (False, True), (False, True)):
        a = make(T, S, "full", True, recon, start=2)
        check(a, **extras(S, key_bias, k_norm))
        if T == 1 and S == 40:
            check(a, window=5, sinks=2, **extras(S, key_bias, k_norm))


def test_latent_keys_fast_matches_reference():
    """The torch backend's ``graphwright.latent_keys``: rotated (full, partial), pre-RoPE, k_norm."""
    from graphwright.codegen.torch.latent_attention import latent_keys_fast
    from graphwright.ops.eviction import latent_keys_reference
    for rope, k_norm in itertools.product(("full", "partial", "none"), (False, True)):
        a = make(1, 13, rope)
        kn = extras(13, False, k_norm)
        args = (a["c_k"], a["k_up"], a["k_bias"], a["k_pos"], a["inv_freq"], 1.5, D, kn.get("k_norm"), 1e-5)
        torch.testing.assert_close(latent_keys_fast(*args), latent_keys_reference(*args), atol=1e-5, rtol=1e-5)
