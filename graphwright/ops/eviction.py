"""KV-eviction ops: ``torch.library`` registrations with fake impls; semantics in the ``*_ref`` modules.

One eviction node per layer sits after that layer's attention node and turns "cache + this step's
tokens" into the next step's cache (shapes in ``eviction_ref``):

* ``graphwright.evict_h2o``      (q, k, v, q_pos, k_pos, score, ...)         -> (k, v, k_pos, score)
* ``graphwright.evict_snapkv``   (q, k, v, q_pos, k_pos, ...)                -> (k, v, k_pos)
* ``graphwright.evict_fastgen``  (q, k, v, q_pos, k_pos, score, token_class,
                                  new_class, policy, ...)                    -> (k, v, k_pos, score, token_class, policy)
* ``graphwright.evict_streaming``(k, v, q_pos, k_pos, sinks, window)         -> (k, v, k_pos)

Policies that need attention probabilities (H2O, SnapKV, FastGen) recompute q.k^T inside the
eviction op rather than asking the attention op for them: the attention op and all its backends
(SDPA, Triton, ONNX ``Attention``) stay unchanged, and at decode the extra work is g*S dot
products per KV head, the same order as the gather that compacts the cache anyway.

Eviction from latent caches (``lowrank_kv`` first) scores with keys rebuilt by
``graphwright.latent_keys`` (fp32 [B, Hk, S, D], the same keys ``graphwright.latent_attention``
attends to) and passes the shared latent payload as a one-head ``v`` ([B, 1, S, r]): the op then
keeps the union of the KV heads' sets (see ``eviction_ref.compact``).

StreamingLLM also needs ``graphwright.rope_invert`` (post-RoPE -> pre-RoPE at absolute positions)
and ``graphwright.rope_cache_index`` (rotate q and the pre-RoPE cache by cache index).

The output length of an eviction op is data dependent (the largest kept count over rows and
heads), so fake impls allocate an unbacked size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .eviction_ref import h2o_reference, snapkv_reference, streaming_reference
from .fastgen_ref import fastgen_reference
from .latent_attention import rebuild_keys
from .rope_index_ref import rope_cache_index_reference, rope_invert_reference

_LIB = "graphwright"


def _fresh(outs, *inputs):
    """Custom ops must not return their inputs: copy any output that is one (the no-eviction fast path)."""
    ids = {id(t) for t in inputs if isinstance(t, Tensor)}
    return tuple(o.clone() if id(o) in ids else o for o in outs)


def _fake_cache(k, v, k_pos, *extras):
    n = torch.library.get_ctx().new_dynamic_size()
    B, Hk = k.shape[:2]
    return (k.new_empty(B, Hk, n, k.shape[-1]), v.new_empty(B, v.shape[1], n, v.shape[-1]), k_pos.new_empty(B, Hk, n),
            *[e.new_empty(B, Hk, n) for e in extras])


@torch.library.custom_op(f"{_LIB}::evict_h2o", mutates_args=())
def evict_h2o(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, score: Tensor, scale: float,
              heavy_n: int, heavy_f: float, recent_n: int, recent_f: float,
              key_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """H2O: keep the last ``recent`` tokens and the top ``heavy`` by cumulative attention."""
    out = h2o_reference(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias)
    return _fresh(out, k, v, k_pos, score)


@evict_h2o.register_fake
def _(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    return _fake_cache(k, v, k_pos, score.new_empty(0, dtype=torch.float32))


@torch.library.custom_op(f"{_LIB}::evict_snapkv", mutates_args=())
def evict_snapkv(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, budget: int,
                 window: int, kernel: int, pool: str, key_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """SnapKV: compress the prompt to ``budget`` tokens after prefill; decode appends."""
    out = snapkv_reference(q, k, v, q_pos, k_pos, scale, budget, window, kernel, pool, key_bias)
    return _fresh(out, k, v, k_pos)


@evict_snapkv.register_fake
def _(q, k, v, q_pos, k_pos, scale, budget, window, kernel, pool, key_bias=None):
    return _fake_cache(k, v, k_pos)


@torch.library.custom_op(f"{_LIB}::evict_fastgen", mutates_args=())
def evict_fastgen(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, score: Tensor, token_class: Tensor,
                  new_class: Tensor, policy: Tensor, scale: float, recovery: float, local_n: int, local_f: float,
                  frequent_n: int, frequent_f: float, criterion: str, force: str,
                  key_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """FastGen: profile each KV head at prefill, then follow its policy at every step."""
    out = fastgen_reference(q, k, v, q_pos, k_pos, score, token_class, new_class, policy, scale, recovery,
                            local_n, local_f, frequent_n, frequent_f, criterion, force, key_bias)
    return _fresh(out, k, v, k_pos, score, token_class, policy)


@evict_fastgen.register_fake
def _(q, k, v, q_pos, k_pos, score, token_class, new_class, policy, scale, recovery, local_n, local_f,
      frequent_n, frequent_f, criterion, force, key_bias=None):
    kk, vv, kp, sc = _fake_cache(k, v, k_pos, score.new_empty(0, dtype=torch.float32))
    B, Hk, n = kp.shape
    return kk, vv, kp, sc, token_class.new_empty(B, Hk, n, dtype=torch.int8), policy.new_empty(B, Hk, 1)


@torch.library.custom_op(f"{_LIB}::evict_streaming", mutates_args=())
def evict_streaming(k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, sinks: int,
                    window: int) -> tuple[Tensor, Tensor, Tensor]:
    """StreamingLLM: keep ``sinks`` first and ``window`` last tokens."""
    return _fresh(streaming_reference(k, v, q_pos, k_pos, sinks, window), k, v, k_pos)


@evict_streaming.register_fake
def _(k, v, q_pos, k_pos, sinks, window):
    return _fake_cache(k, v, k_pos)


@torch.library.custom_op(f"{_LIB}::rope_invert", mutates_args=())
def rope_invert(x: Tensor, pos: Tensor, inv_freq: Tensor, scaling: float) -> Tensor:
    """Undo the model's RoPE at absolute positions: x [B, H, T, D], pos [B, T]."""
    return rope_invert_reference(x, pos, inv_freq, scaling)


@rope_invert.register_fake
def _(x, pos, inv_freq, scaling):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_LIB}::rope_cache_index", mutates_args=())
def rope_cache_index(q: Tensor, k: Tensor, k_pos: Tensor, inv_freq: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Rotate pre-RoPE q [B, H, T, D] and k [B, Hk, S, D] by their cache indices."""
    return rope_cache_index_reference(q, k, k_pos, inv_freq, scaling)


@rope_cache_index.register_fake
def _(q, k, k_pos, inv_freq, scaling):
    return torch.empty_like(q), torch.empty_like(k)


def latent_keys_reference(c_k: Tensor, k_up: Tensor, k_bias: Optional[Tensor], k_pos: Tensor,
                          inv_freq: Optional[Tensor], rope_scaling: float, head_dim: int,
                          k_norm: Optional[Tensor] = None, k_norm_eps: float = 1e-6) -> Tensor:
    """Keys [B, Hk, S, D] fp32 of a latent cache c_k [B, S, r_k], key-normed (``k_norm`` [D], optional) and
    rotated at k_pos [B, S]: exactly the keys latent_attention attends to."""
    return rebuild_keys(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm, k_norm_eps)


@torch.library.custom_op(f"{_LIB}::latent_keys", mutates_args=())
def latent_keys(c_k: Tensor, k_up: Tensor, k_bias: Optional[Tensor], k_pos: Tensor, inv_freq: Optional[Tensor],
                rope_scaling: float, head_dim: int, k_norm: Optional[Tensor] = None,
                k_norm_eps: float = 1e-6) -> Tensor:
    """Rebuild the post-RoPE keys of a latent cache, for eviction scores."""
    if k_norm is not None and tuple(k_norm.shape) != (head_dim,):
        raise ValueError(f"latent_keys: k_norm must be [head_dim] = [{head_dim}]; got {list(k_norm.shape)}")
    return latent_keys_reference(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm, k_norm_eps)


@latent_keys.register_fake
def _(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm=None, k_norm_eps=1e-6):
    B, S, _ = c_k.shape
    return c_k.new_empty(B, k_up.shape[1] // head_dim, S, head_dim, dtype=torch.float32)


EVICT_H2O = torch.ops.graphwright.evict_h2o.default
EVICT_SNAPKV = torch.ops.graphwright.evict_snapkv.default
EVICT_FASTGEN = torch.ops.graphwright.evict_fastgen.default
EVICT_STREAMING = torch.ops.graphwright.evict_streaming.default
ROPE_INVERT = torch.ops.graphwright.rope_invert.default
ROPE_CACHE_INDEX = torch.ops.graphwright.rope_cache_index.default
LATENT_KEYS = torch.ops.graphwright.latent_keys.default
EVICT_OPS = (EVICT_H2O, EVICT_SNAPKV, EVICT_FASTGEN, EVICT_STREAMING)

# op -> reference implementation: the lowering tables ("reference" and "torch" backends) use these
REFERENCES = {
    EVICT_H2O: h2o_reference,
    EVICT_SNAPKV: snapkv_reference,
    EVICT_FASTGEN: fastgen_reference,
    EVICT_STREAMING: streaming_reference,
    ROPE_INVERT: rope_invert_reference,
    ROPE_CACHE_INDEX: rope_cache_index_reference,
    LATENT_KEYS: latent_keys_reference,
}
