"""graphwright ops: references against naive per-head math, fake shapes, torch backend vs reference."""

import pytest
import torch

from graphwright.capture import ops
from graphwright.codegen.torch.attention import attention_sdpa


def naive_attention(q, k, v, q_pos, k_pos, scale, window=0):
    """Per batch row, per head, per query loop: the definition written the slow way."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // g
            kp = k_pos[b] if k_pos.dim() == 2 else k_pos[b, kh]
            for t in range(T):
                qp = int(q_pos[b, t])
                vis = [j for j in range(k.shape[2]) if kp[j] >= 0 and (qp < 0 or (kp[j] <= qp and (window <= 0 or qp - kp[j] < window)))]
                s = torch.stack([(q[b, h, t].double() @ k[b, kh, j].double()) * scale for j in vis])
                p = torch.softmax(s, 0)
                out[b, h, t] = sum(p[i] * v[b, kh, j].double() for i, j in enumerate(vis))
    return out


def _case(B, H, Hk, T, S, D, pad_rows=True, per_head=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g))
    k_pos = torch.arange(S).expand(B, S).clone()
    if pad_rows and B > 1:
        k_pos[1, :2] = -1  # row 1 is left-padded by 2
    q_pos = k_pos[:, S - T:].clone()
    if per_head:
        k_pos = k_pos[:, None].expand(B, Hk, S).clone()
        k_pos[0, -1, 0] = -1  # one head dropped one key
    return q, k, v, q_pos, k_pos


CASES = [  # B, H, Hk, T, S, D, window
    (1, 4, 4, 5, 5, 8, 0),
    (2, 4, 2, 5, 9, 8, 0),
    (2, 9, 3, 1, 17, 16, 0),
    (3, 6, 1, 4, 11, 4, 3),
    (2, 2, 2, 7, 7, 8, 2),
]


@pytest.mark.parametrize("B,H,Hk,T,S,D,window", CASES)
def test_reference_matches_naive(B, H, Hk, T, S, D, window):
    q, k, v, qp, kp = _case(B, H, Hk, T, S, D)
    got = ops.attention_reference(q, k, v, qp, kp, D ** -0.5, window)
    want = naive_attention(q, k, v, qp, kp, D ** -0.5, window)
    real = qp >= 0  # padding query rows are unspecified garbage
    assert torch.allclose(got.double().permute(0, 2, 1, 3)[real], want.permute(0, 2, 1, 3)[real], atol=1e-5)


def test_per_head_key_positions():
    q, k, v, qp, kp = _case(2, 4, 2, 3, 6, 8, per_head=True)
    got = ops.attention_reference(q, k, v, qp, kp, 0.3)
    want = naive_attention(q, k, v, qp, kp, 0.3)
    real = qp >= 0
    assert torch.allclose(got.double().permute(0, 2, 1, 3)[real], want.permute(0, 2, 1, 3)[real], atol=1e-5)


@pytest.mark.parametrize("B,H,Hk,T,S,D,window", CASES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_torch_backend_matches_reference(B, H, Hk, T, S, D, window, dtype, atol):
    q, k, v, qp, kp = _case(B, H, Hk, T, S, D, seed=1)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ref = ops.attention_reference(q, k, v, qp, kp, 0.25, window).float()
    got = attention_sdpa(q, k, v, qp, kp, 0.25, window).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).abs().max() < atol


def test_registered_op_and_fake_shapes():
    q, k, v, qp, kp = _case(2, 4, 2, 3, 6, 8)
    out = torch.ops.graphwright.attention(q, k, v[..., :5].contiguous(), qp, kp, 0.5, 0)
    assert out.shape == (2, 4, 3, 5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fo = torch.ops.graphwright.attention(fq, fk, fv, mode.from_tensor(qp), mode.from_tensor(kp), 0.5, 0)
    assert fo.shape == out.shape[:3] + (8,)


def test_attention_shape_errors_are_clear():
    q, k, v, qp, kp = _case(2, 4, 2, 3, 6, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        torch.ops.graphwright.attention(q[:, :3], k, v, qp, kp, 0.5, 0)
    with pytest.raises(ValueError, match="q_pos must be"):
        torch.ops.graphwright.attention(q, k, v, qp[:, :2], kp, 0.5, 0)


def test_moe_reference_matches_transformers_experts(tiny):
    """The moe_experts reference is transformers' own eager loop, bit for bit."""
    m = tiny("tiny-mixtral")
    experts = m.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 64, generator=g)
    idx = torch.randint(0, 4, (13, 2), generator=g)
    idx[:, 1] = (idx[:, 0] + 1) % 4
    idx[:4] = torch.tensor([0, 1])  # crowd one pair; expert 3 may be empty
    w = torch.softmax(torch.randn(13, 2, generator=g), -1)
    saved = experts.config._experts_implementation
    experts.config._experts_implementation = "eager"
    try:
        want = experts(x, idx, w)
    finally:
        experts.config._experts_implementation = saved
    got = ops.moe_experts_reference(x, idx, w, experts.gate_up_proj, experts.down_proj, "silu")
    assert torch.equal(got, want)
    # all tokens on one expert, and a single token (decode)
    idx1 = torch.zeros(13, 2, dtype=torch.long)
    idx1[:, 1] = 2
    assert ops.moe_experts_reference(x, idx1, w, experts.gate_up_proj, experts.down_proj, "silu").shape == (13, 64)
    one = ops.moe_experts_reference(x[:1], idx[:1], w[:1], experts.gate_up_proj, experts.down_proj, "silu")
    assert torch.allclose(one, want[:1], atol=1e-6)


def test_key_bias_reweights_columns_like_pasta():
    """A bias of log(a) on some key columns multiplies their unnormalised attention by a."""
    q, k, v, qp, kp = _case(1, 4, 2, 3, 6, 8, pad_rows=False)
    a = 0.01
    bias = torch.zeros(1, 4, 6)
    bias[:, 1, :3] = torch.log(torch.tensor(a))  # head 1 down-weights the first 3 keys
    got = ops.attention_reference(q, k, v, qp, kp, 0.5, key_bias=bias)
    base = ops.attention_reference(q, k, v, qp, kp, 0.5)
    assert torch.equal(got[:, [0, 2, 3]], base[:, [0, 2, 3]])  # untouched heads are bit-identical
    # closed form for head 1: p'_j = w_j p_j / sum_i w_i p_i with w = a on the biased columns
    s = (q[0, 1] @ k[0, 0].T) * 0.5
    s = s.masked_fill(~(kp[0][None] <= qp[0][:, None]), float("-inf"))
    p = torch.softmax(s, -1)
    w = torch.ones(6)
    w[:3] = a
    p2 = p * w / (p * w).sum(-1, keepdim=True)
    assert torch.allclose(got[0, 1], p2 @ v[0, 0], atol=1e-6)
    assert torch.allclose(attention_sdpa(q, k, v, qp, kp, 0.5, 0, bias), got, atol=1e-5)
    with pytest.raises(ValueError, match=r"key_bias must be \[B, H, S\]"):
        torch.ops.graphwright.attention(q, k, v, qp, kp, 0.5, 0, bias[:, :2])
