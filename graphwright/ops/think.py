"""ThinK key-channel pruning ops (semantics and shapes in ``think_ref``; the pass is ``passes/think.py``).

* ``graphwright.think_prune(q, k, k_pruned, channels, k_full, v, q_pos, k_pos, keep, recent, window, pool)
  -> (k_pruned, channels, k_full, v, k_pos)``: at the end of prefill, chooses ``keep`` key channels per
  KV head and splits the layer's key cache into narrow old keys and full-width recent keys; at decode it
  hands its state back unchanged (``k_full`` is the appended full-width cache).
* ``graphwright.think_expand(k_pruned, channels, head_dim) -> k``: the narrow keys scattered back to
  ``head_dim`` channels with zeros, which the unchanged attention op reads before the full-width keys.

The output lengths of ``think_prune`` depend on the prompt (and on eviction before it), so its fake
impl allocates unbacked sizes. Both ops are registered in the eviction ``REFERENCES`` table, so the
reference, torch and triton backends run the references (the torch backend's in-place cache append
still serves the full-width keys: at decode the reference returns its inputs without a copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .eviction_policy import LIB, REFERENCES, _fresh
from .think_ref import think_expand_reference, think_prune_reference


@torch.library.custom_op(f"{LIB}::think_prune", mutates_args=())
def think_prune(q: Tensor, k: Tensor, k_pruned: Tensor, channels: Tensor, k_full: Tensor, v: Tensor, q_pos: Tensor,
                k_pos: Tensor, keep: int, recent: int, window: int, pool: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ThinK: split the key cache into kept channels of old tokens and full-width recent tokens (see ``think_ref``)."""
    args = (q, k, k_pruned, channels, k_full, v, q_pos, k_pos)
    return _fresh(think_prune_reference(*args, keep, recent, window, pool), args)


@think_prune.register_fake
def _(q, k, k_pruned, channels, k_full, v, q_pos, k_pos, keep, recent, window, pool):
    ctx = torch.library.get_ctx()
    B, Hk, _, D = k.shape
    n_old, n_full, n = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (k.new_empty(B, Hk, n_old, keep), channels.new_empty(B, Hk, 1, keep), k.new_empty(B, Hk, n_full, D),
            v.new_empty(B, Hk, n, v.shape[-1]), k_pos.new_empty(*k_pos.shape[:-1], n))


@torch.library.custom_op(f"{LIB}::think_expand", mutates_args=())
def think_expand(k_pruned: Tensor, channels: Tensor, head_dim: int) -> Tensor:
    """Scatter narrow keys [B, Hk, S, keep] back to [B, Hk, S, head_dim] (zeros in the pruned channels)."""
    return think_expand_reference(k_pruned, channels, head_dim)


@think_expand.register_fake
def _(k_pruned, channels, head_dim):
    B, Hk, S, _ = k_pruned.shape
    return k_pruned.new_empty(B, Hk, S, head_dim)


THINK_PRUNE = torch.ops.graphwright.think_prune.default
THINK_EXPAND = torch.ops.graphwright.think_expand.default

REFERENCES.update({THINK_PRUNE: think_prune_reference, THINK_EXPAND: think_expand_reference})
