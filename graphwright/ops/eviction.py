"""KV-eviction ops: the policies' ops plus the RoPE/latent helpers; semantics in the ``*_ref`` modules.

Each policy is one ``EvictionPolicy`` object in ``policy_<name>.py``, registered by
``eviction_policy.register_policy`` (op, fake, ``EVICT_OPS``, ``REFERENCES``; see that module for
the three steps to add one). This module imports them all, so importing it registers every op.

One eviction node per layer sits after that layer's attention node and turns "cache + this step's
tokens" into the next step's cache (shapes in ``eviction_ref``):

* ``graphwright.evict_h2o``      (q, k, v, q_pos, k_pos, score, ...)         -> (k, v, k_pos, score)
* ``graphwright.evict_snapkv``   (q, k, v, q_pos, k_pos, ...)                -> (k, v, k_pos)
* ``graphwright.evict_fastgen``  (q, k, v, q_pos, k_pos, score, token_class,
                                  new_class, policy, ...)                    -> (k, v, k_pos, score, token_class, policy)
* ``graphwright.evict_streaming``(k, v, q_pos, k_pos, sinks, window)         -> (k, v, k_pos)
* ``graphwright.evict_keyformer``(q, k, v, q_pos, k_pos, score, meta, ...)   -> (k, v, k_pos, score, meta)
* ``graphwright.evict_scissorhands``(q, k, v, q_pos, k_pos, bits, count,
                                  step, ...)                                 -> (k, v, k_pos, bits, count, step)

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

from .adakv_decode import EVICT_ADAKV_DECODE  # noqa: F401
from .adakv_scored import EVICT_ADAKV_SCORED  # noqa: F401
from .adakv_shares import EVICT_ADAKV_SHARES  # noqa: F401
from .eviction_policy import EVICT_OPS, POLICIES, REFERENCES, EvictionPolicy, register_policy  # noqa: F401
from .latent_attention import rebuild_keys
from .policy_adakv import EVICT_ADAKV, PACKED_OPS  # noqa: F401
from .policy_fastgen import EVICT_FASTGEN, FASTGEN_POLICY  # noqa: F401
from .policy_h2o import EVICT_H2O, H2O_POLICY  # noqa: F401
from .policy_keyformer import EVICT_KEYFORMER, KEYFORMER_POLICY  # noqa: F401
from .policy_scissorhands import EVICT_SCISSORHANDS, SCISSORHANDS_POLICY  # noqa: F401
from .policy_scored import EVICT_SCORED, EVICT_SCORED_ACC, EVICT_SCORED_ROPE  # noqa: F401
from .policy_snapkv import EVICT_SNAPKV, SNAPKV_POLICY  # noqa: F401
from .policy_streaming import EVICT_STREAMING, STREAMING_POLICY  # noqa: F401
from .rerotate import REROTATE_KEYS  # noqa: F401  (evict(..., rerotate=True)'s op joins REFERENCES)
from .rope_index_ref import rope_cache_index_reference, rope_invert_reference
from .think import THINK_EXPAND, THINK_PRUNE  # noqa: F401  (ThinK's ops join REFERENCES)

_LIB = "graphwright"


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
    """Rebuild the keys of a latent cache: post-RoPE for eviction scores, pre-RoPE (inv_freq None) for streaming."""
    if k_norm is not None and tuple(k_norm.shape) != (head_dim,):
        raise ValueError(f"latent_keys: k_norm must be [head_dim] = [{head_dim}]; got {list(k_norm.shape)}")
    return latent_keys_reference(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm, k_norm_eps)


@latent_keys.register_fake
def _(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, head_dim, k_norm=None, k_norm_eps=1e-6):
    B, S, _ = c_k.shape
    return c_k.new_empty(B, k_up.shape[1] // head_dim, S, head_dim, dtype=torch.float32)


ROPE_INVERT = torch.ops.graphwright.rope_invert.default
ROPE_CACHE_INDEX = torch.ops.graphwright.rope_cache_index.default
LATENT_KEYS = torch.ops.graphwright.latent_keys.default

# op -> reference implementation: the lowering tables ("reference" and "torch" backends) use these;
# the policies' ops were added by register_policy
REFERENCES.update({
    ROPE_INVERT: rope_invert_reference,
    ROPE_CACHE_INDEX: rope_cache_index_reference,
    LATENT_KEYS: latent_keys_reference,
})
