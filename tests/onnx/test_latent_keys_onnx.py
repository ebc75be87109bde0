"""The ONNX translation of the latent key rebuild (``codegen/onnx/latent_attention._keys``: MatMul, optional key RMSNorm,
opset-23 ``RotaryEmbedding`` on per-position cos/sin) equals the reference ``ops.latent_attention.rebuild_keys``.

Run eagerly through onnxscript (ONNX Runtime evaluates each op), on random latents: full and partial rotary dims,
rope_scaling != 1, k_bias, k_norm, padding slots (k_pos = -1, rotated as position 0 like the reference) and positions
far apart in one row."""

import numpy as np
import pytest
import torch

from graphwright.codegen.onnx import latent_attention as onnx_latent
from graphwright.ops.latent_attention import rebuild_keys


@pytest.mark.parametrize("rotary,k_norm", [(16, False), (8, False), (16, True)])
def test_onnx_latent_keys_equal_the_reference(rotary, k_norm):
    torch.manual_seed(rotary + k_norm)
    B, S, r, Hk, D = 2, 7, 12, 2, 16
    c_k, k_up, k_bias = torch.randn(B, S, r), torch.randn(r, Hk * D), torch.randn(Hk * D)
    k_pos = torch.tensor([[-1, 0, 1, 2, 3, 100, 5], [9, 8, 7, -1, 4000, 2, 1]])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    norm = torch.rand(D) + 0.5 if k_norm else None
    got = onnx_latent._keys(c_k.numpy(), k_up.numpy(), k_bias.numpy(), k_pos.numpy(), inv_freq.numpy(), 0.8, D,
                            None if norm is None else norm.numpy(), 1e-6)
    want = rebuild_keys(c_k, k_up, k_bias, k_pos, inv_freq, 0.8, D, norm, 1e-6)
    got = np.asarray(got.value)  # an onnxscript eager Tensor
    assert got.shape == tuple(want.shape) == (B, Hk, S, D)
    assert np.abs(got - want.numpy()).max() < 1e-4 * max(1.0, float(want.abs().max()))
    if rotary < D:  # the dims past the rotary ones pass through unrotated
        plain = rebuild_keys(c_k, k_up, k_bias, k_pos, inv_freq[:0], 1.0, D, norm, 1e-6)
        assert np.allclose(got[..., rotary:], plain[..., rotary:].numpy(), atol=1e-5)
