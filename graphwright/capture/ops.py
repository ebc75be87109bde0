"""graphwright's custom ops: the nodes every rewrite pass and backend works on.

Each op is a ``torch.library`` custom op with a fake (meta) implementation for
``torch.export`` and a pure-torch reference implementation that *defines* its semantics.
Backends (Triton, ONNX) are tested against these references.

Conventions (shared by all attention variants):

* ``q``: [B, H, T, D] queries, already rotated (RoPE) by the model.
* ``k``, ``v``: [B, H_kv, S, D] keys/values of the whole visible context (cache + new tokens);
  H must be a multiple of H_kv (grouped-query attention, g = H / H_kv).
* ``q_pos``: [B, T] int64 absolute positions of the queries; -1 marks a left-padding token.
* ``k_pos``: [B, S] (or [B, H_kv, S] for per-head caches) int64 absolute positions of the keys;
  -1 marks an empty or padding slot that is never attended.
* ``key_bias`` (optional): [B, H, S] additive pre-softmax bias per query head and key column,
  shared by every query row (PASTA steering adds log(alpha) here; no T x S mask is built).
* A key is visible to a query iff ``0 <= k_pos <= q_pos`` (and ``q_pos - k_pos < window``
  when ``window > 0``, unless ``k_pos < sinks``: the first ``sinks`` positions stay visible to
  every later query, StreamingLLM's attention sinks as a mask; ``sinks`` has no effect without a window).
  Padding query rows (q_pos = -1) see every valid key: their output is
  finite garbage that is never read, instead of the NaN a fully masked softmax would give.
"""

from __future__ import annotations

import torch

_LIB = "graphwright"


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0, sinks: int = 0) -> torch.Tensor:
    """Boolean visibility [B, 1|H_kv, 1, T, S] of keys for queries (True = attend).

    Shaped to broadcast against scores laid out as [B, H_kv, g, T, S].
    """
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None, :]  # [B, 1, S]
    kp = k_pos[:, :, None, None, :]  # [B, Hk|1, 1, 1, S]
    qp = q_pos[:, None, None, :, None]  # [B, 1, 1, T, 1]
    causal = kp <= qp
    if window > 0:
        recent = qp - kp < window
        causal = causal & ((recent | (kp < sinks)) if sinks > 0 else recent)
    return (kp >= 0) & (causal | (qp < 0))


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int = 0,
    key_bias: torch.Tensor | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """Causal (optionally windowed, optionally key-biased) grouped-query attention; returns [B, H, T, Dv].

    Scores and softmax are computed in fp32 and cast back to v's dtype, so low-precision
    variants are judged against the same math.
    """
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    # Fold the g query heads of a KV group into the query axis: one [g*T, D] x [D, S] matmul per
    # KV head, with no copy of K or V per query head.
    qg = q.reshape(B, Hk, g * T, D).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)).view(B, Hk, g, T, S) * scale
    if key_bias is not None:
        scores = scores + key_bias.float().view(B, Hk, g, 1, S)
    scores = scores.masked_fill(~visible_mask(q_pos, k_pos, window, sinks), torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).view(B, Hk, g * T, S)
    out = torch.matmul(probs, v.float())  # [B, Hk, g*T, Dv]
    return out.reshape(B, H, T, v.shape[-1]).to(v.dtype)


def _check_attention_args(q, k, v, q_pos, k_pos, key_bias=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"graphwright.attention wants 4-D q/k/v [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on [B, H_kv, S]")
    if q_pos.shape != q.shape[:1] + q.shape[2:3]:
        raise ValueError(f"q_pos must be [B, T] = {[q.shape[0], q.shape[2]]}; got {list(q_pos.shape)}")
    if k_pos.shape[-1] != k.shape[2]:
        raise ValueError(f"k_pos last dim must equal S = {k.shape[2]}; got {list(k_pos.shape)}")
    if key_bias is not None and tuple(key_bias.shape) != (q.shape[0], q.shape[1], k.shape[2]):
        raise ValueError(f"key_bias must be [B, H, S] = {[q.shape[0], q.shape[1], k.shape[2]]}; got {list(key_bias.shape)}")


@torch.library.custom_op(f"{_LIB}::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int = 0,
    key_bias: torch.Tensor | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """One layer's attention; the torch implementation is the reference."""
    _check_attention_args(q, k, v, q_pos, k_pos, key_bias)
    return attention_reference(q, k, v, q_pos, k_pos, scale, window, key_bias, sinks)


@attention.register_fake
def _attention_fake(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, sinks=0):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), dtype=v.dtype)


SUPPORTED_MOE_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_pytorch_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"unsupported MoE activation {name!r}; supported: {SUPPORTED_MOE_ACTIVATIONS}")


def moe_experts_reference(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act: str,
) -> torch.Tensor:
    """Routed expert compute with transformers' loop semantics (the bit-exact reference).

    hidden [N, d]; top_k_index, top_k_weights [N, k]; gate_up_proj [E, 2I, d] (gate rows
    first, then up); down_proj [E, d, I]. For each hit expert e in ascending order:
    y[t] += (down_e(act(gate_e x_t) * up_e x_t) * w[t, slot]).to(hidden dtype), accumulated
    with ``index_add_`` into zeros, exactly as transformers' eager experts loop does.
    """
    num_experts = gate_up_proj.shape[0]
    out = torch.zeros_like(hidden)
    for e in torch.unique(top_k_index).tolist():
        if e < 0 or e >= num_experts:
            continue
        # (slot, token) ordered slot-major, as transformers' one_hot(...).permute(2, 1, 0) gives
        slot, tok = torch.where(top_k_index.T == e)
        gate, up = torch.nn.functional.linear(hidden[tok], gate_up_proj[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(_act(act, gate) * up, down_proj[e])
        y = y * top_k_weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


@torch.library.custom_op(f"{_LIB}::moe_experts", mutates_args=())
def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act: str,
) -> torch.Tensor:
    """One MoE block's routed expert compute; the torch implementation is the reference."""
    return moe_experts_reference(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act)


@moe_experts.register_fake
def _moe_experts_fake(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act):
    return torch.empty_like(hidden)


ATTENTION = torch.ops.graphwright.attention.default
MOE_EXPERTS = torch.ops.graphwright.moe_experts.default
GRAPHWRIGHT_OPS = {ATTENTION: "attention", MOE_EXPERTS: "moe_experts"}
