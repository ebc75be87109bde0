"""``graphwright.latent_attention``'s appended arguments (key_bias, sinks, k_norm) and ``latent_keys``' k_norm.

Each is checked against ``attention_reference`` over keys rebuilt by hand in this file
(c_k @ k_up + k_bias, a hand-written RMSNorm, a hand-written rotate_half RoPE), in both value
modes (absorbed: v_up None; reconstruct), prefill-shaped (T = S, row 1 left-padded so q_pos = -1
on its padding) and decode-shaped (T = 1); then the torch backend and the ONNX translation (run by
ONNX Runtime) against the reference. The Triton kernel's cases are in tests/triton.
"""

from __future__ import annotations

import pytest
import torch

import graphwright  # noqa: F401 - registers the ops
from graphwright.capture.ops import attention_reference
from graphwright.ops.latent_attention import LATENT_ATTENTION, rebuild_keys

B, H, HK, D, RK, RV, DV = 2, 4, 2, 16, 12, 10, 8
SCALE, ROPE_SCALING = 0.25, 1.5
SHAPES = {"prefill": (9, 9), "decode": (1, 13)}  # name -> (T, S)
MODES = ("absorbed", "reconstruct")


def make(shape: str, mode: str, rot: int = 12, pad: int = 3, seed: int = 0) -> dict:
    """Arguments of the op by name: GQA 4/2, partial rotary (``rot`` of D dims), row 1 left-padded."""
    T, S = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    k_pos = torch.arange(S).repeat(B, 1)
    k_pos[1] = torch.arange(S) - pad
    k_pos[1, :pad] = -1
    recon = mode == "reconstruct"
    return dict(
        q=torch.randn(B, H, T, D, generator=g), c_k=torch.randn(B, S, RK, generator=g),
        c_v=torch.randn(B, S, RV, generator=g), k_up=torch.randn(RK, HK * D, generator=g) / RK ** 0.5,
        k_bias=torch.randn(HK * D, generator=g),
        v_up=torch.randn(RV, HK * DV, generator=g) / RV ** 0.5 if recon else None,
        v_bias=torch.randn(HK * DV, generator=g) if recon else None,
        q_pos=k_pos[:, S - T:].clone(), k_pos=k_pos,
        inv_freq=1.0 / (100.0 ** (torch.arange(0, rot, 2).float() / rot)),
        rope_scaling=ROPE_SCALING, scale=SCALE,
    )


def extras(a: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    S = a["c_k"].shape[1]
    return dict(key_bias=torch.randn(B, H, S, generator=g), k_norm=1.0 + 0.3 * torch.randn(D, generator=g))


def hand_keys(a: dict, k_norm=None, eps: float = 1e-6) -> torch.Tensor:
    """RoPE(RMSNorm(c_k @ k_up + k_bias)) [B, Hk, S, D], written out."""
    S = a["c_k"].shape[1]
    k = (a["c_k"] @ a["k_up"] + a["k_bias"]).view(B, S, HK, D).permute(0, 2, 1, 3)
    if k_norm is not None:
        k = k_norm * k / torch.sqrt((k * k).mean(dim=-1, keepdim=True) + eps)
    R = 2 * a["inv_freq"].shape[0]
    ang = a["k_pos"].clamp(min=0).float()[:, None, :, None] * a["inv_freq"]  # [B, 1, S, R/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1) * ROPE_SCALING, torch.cat([ang.sin()] * 2, -1) * ROPE_SCALING
    x1, x2, rest = k[..., :R // 2], k[..., R // 2:R], k[..., R:]
    return torch.cat([k[..., :R] * cos + torch.cat([-x2, x1], -1) * sin, rest], -1)


def hand_values(a: dict) -> torch.Tensor:
    if a["v_up"] is None:
        return a["c_v"][:, None]
    S = a["c_v"].shape[1]
    return (a["c_v"] @ a["v_up"] + a["v_bias"]).view(B, S, HK, DV).permute(0, 2, 1, 3)


def expected(a: dict, window=0, key_bias=None, sinks=0, k_norm=None, k_norm_eps=1e-6) -> torch.Tensor:
    return attention_reference(a["q"], hand_keys(a, k_norm, k_norm_eps), hand_values(a), a["q_pos"], a["k_pos"],
                               SCALE, window, key_bias, sinks)


def op(a: dict, **kw) -> torch.Tensor:
    return LATENT_ATTENTION(*a.values(), **kw)


def _close(out, ref, tol=1e-5):
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_defaults_are_the_old_op_bit_for_bit(shape, mode):
    a = make(shape, mode)
    old_k = rebuild_keys(a["c_k"], a["k_up"], a["k_bias"], a["k_pos"], a["inv_freq"], ROPE_SCALING, D)
    for window in (0, 4):
        old = attention_reference(a["q"], old_k, hand_values(a), a["q_pos"], a["k_pos"], SCALE, window)
        assert torch.equal(LATENT_ATTENTION(*a.values(), window), old)  # the 13 old positional arguments
        zeros = torch.zeros(B, H, a["c_k"].shape[1])
        assert torch.equal(op(a, window=window, key_bias=zeros, sinks=0, k_norm=None), old)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_key_bias_sinks_and_k_norm_match_rebuilt_keys(shape, mode):
    a, x = make(shape, mode), extras(make(shape, mode))
    plain = expected(a)
    _close(op(a), plain)
    cases = {  # name -> kwargs; each must change the result and match the hand-built reference
        "key_bias": dict(key_bias=x["key_bias"]),
        "window_sinks": dict(window=3, sinks=2),
        "k_norm": dict(k_norm=x["k_norm"], k_norm_eps=1e-5),
        "all": dict(window=3, sinks=2, key_bias=x["key_bias"], k_norm=x["k_norm"]),
    }
    for name, kw in cases.items():
        out = op(a, **kw)
        _close(out, expected(a, **kw))
        assert (out - plain).abs().max() > 1e-2, f"{name} has no effect on this input"
    # sinks matter on top of the window alone (positions 0..1 are outside a 3-wide window for late queries)
    assert (op(a, window=3, sinks=2) - op(a, window=3)).abs().max() > 1e-2


def test_latent_keys_k_norm():
    a, x = make("prefill", "absorbed"), extras(make("prefill", "absorbed"))
    keys = torch.ops.graphwright.latent_keys(a["c_k"], a["k_up"], a["k_bias"], a["k_pos"], a["inv_freq"],
                                             ROPE_SCALING, D, x["k_norm"], 1e-6)
    _close(keys, hand_keys(a, x["k_norm"]))
    plain = torch.ops.graphwright.latent_keys(a["c_k"], a["k_up"], a["k_bias"], a["k_pos"], a["inv_freq"],
                                              ROPE_SCALING, D)
    assert torch.equal(plain, rebuild_keys(a["c_k"], a["k_up"], a["k_bias"], a["k_pos"], a["inv_freq"],
                                           ROPE_SCALING, D))
    with pytest.raises(ValueError, match="k_norm must be"):
        torch.ops.graphwright.latent_keys(a["c_k"], a["k_up"], None, a["k_pos"], None, 1.0, D, torch.ones(D + 1))


def test_bad_arguments_are_named():
    a = make("decode", "absorbed")
    with pytest.raises(ValueError, match=r"key_bias must be \[B, H, S\]"):
        op(a, key_bias=torch.zeros(B, HK, 13))
    with pytest.raises(ValueError, match=r"k_norm must be \[D\]"):
        op(a, k_norm=torch.ones(HK * D))
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        op(a, window=3, sinks=-1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_torch_backend_matches_reference(shape, mode):
    from graphwright.codegen.torch.latent_attention import latent_attention_sdpa
    from graphwright.ops.latent_attention import latent_attention_reference

    a, x = make(shape, mode), extras(make(shape, mode))
    for kw in (dict(), dict(key_bias=x["key_bias"]), dict(window=3, sinks=2), dict(k_norm=x["k_norm"]),
               dict(window=3, sinks=2, key_bias=x["key_bias"], k_norm=x["k_norm"], k_norm_eps=1e-5)):
        _close(latent_attention_sdpa(*a.values(), **kw), latent_attention_reference(*a.values(), **kw), 1e-4)


# --- ONNX: a module calling the op, exported with graphwright's translation table, run by ONNX Runtime ---

class _Call(torch.nn.Module):
    """Calls ``target`` with the tensor arguments as graph inputs and the rest fixed."""

    def __init__(self, target, names, fixed):
        super().__init__()
        self.target, self.names, self.fixed = target, names, fixed

    def forward(self, *tensors):
        return self.target(**dict(zip(self.names, tensors)), **self.fixed)


def _onnx_run(tmp_path, target, kwargs) -> torch.Tensor:
    import onnxruntime as ort

    from graphwright.codegen.onnx.translations import translation_table

    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    tensors = tuple(kwargs[k] for k in names)
    ep = torch.export.export(_Call(target, names, fixed), tensors, strict=False)
    program = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=translation_table(), opset_version=23,
                                input_names=names, output_names=["out"], optimize=True, verbose=False)
    path = tmp_path / "m.onnx"
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    used = {i.name for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, {k: kwargs[k].numpy() for k in names if k in used})[0])


@pytest.mark.parametrize("shape,mode", [("prefill", "absorbed"), ("decode", "reconstruct")])
def test_onnx_translation_matches_reference(tmp_path, shape, mode):
    from graphwright.ops.latent_attention import latent_attention_reference

    a, x = make(shape, mode), extras(make(shape, mode))
    kw = dict(window=3, key_bias=x["key_bias"], sinks=2, k_norm=x["k_norm"], k_norm_eps=1e-5)
    kwargs = {**a, **kw}
    _close(_onnx_run(tmp_path, LATENT_ATTENTION, kwargs), latent_attention_reference(*a.values(), **kw), 1e-4)


def test_onnx_latent_keys_k_norm(tmp_path):
    from graphwright.ops.eviction import LATENT_KEYS

    a, x = make("prefill", "absorbed"), extras(make("prefill", "absorbed"))
    kwargs = dict(c_k=a["c_k"], k_up=a["k_up"], k_bias=a["k_bias"], k_pos=a["k_pos"], inv_freq=a["inv_freq"],
                  rope_scaling=ROPE_SCALING, head_dim=D, k_norm=x["k_norm"], k_norm_eps=1e-6)
    _close(_onnx_run(tmp_path, LATENT_KEYS, kwargs), hand_keys(a, x["k_norm"]), 1e-4)
