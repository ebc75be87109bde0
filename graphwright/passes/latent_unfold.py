"""Unfold a latent layer: the keys and values of ``graphwright.latent_attention`` as graph nodes.

Passes that need a latent layer's keys and values as tensors (``block_sparse`` selects key pages,
``streaming`` re-rotates keys by cache index) insert::

    k = graphwright.latent_keys(c_k, k_up, k_bias, k_pos, inv_freq | None, rope_scaling, D, k_norm, eps)  # [B, Hk, S, D]
    v = c_v[:, None].expand(B, Hk, S, r_v)      # absorbed: one latent value stream, o_proj holds B_V
      | (c_v @ v_up + v_bias) as [B, Hk, S, Dv]  # reconstruct

with every argument read by name from the latent node (``ops/schema.py``), so key norms, biases and
partial rotary carry over. The cache stays latent: only this step's working tensors are dense.
Tested through the passes that use it (``tests/passes/test_lowrank_compose.py``: full rank then the
pass at its exact setting reproduces the dense model's tokens).
"""

from __future__ import annotations

import torch

from ..ops import schema
from ..ops.eviction import LATENT_KEYS

aten = torch.ops.aten


def unfold_keys(graph, node, k_pos, head_dim: int, dtype, **override):
    """Keys [B, Hk, S, D] in ``dtype`` of the latent node, rebuilt at ``k_pos`` (``inv_freq=None``: pre-RoPE)."""
    values = {name: schema.get(node, name) for name in schema.arg_names(LATENT_KEYS)
              if schema.has_arg(node.target, name)}
    values.update(k_pos=k_pos, head_dim=head_dim, **override)
    k = schema.call(graph, LATENT_KEYS, **values)  # fp32
    if dtype != torch.float32:
        k = graph.call_function(aten._to_copy.default, (k,), {"dtype": dtype})
    return k


def unfold_values(graph, node, num_kv_heads: int):
    """Values [B, Hk, S, r_v] (absorbed: the latent stream, a view) or [B, Hk, S, Dv] (reconstruct)."""
    c_v, v_up, v_bias = schema.get(node, "c_v"), schema.get(node, "v_up"), schema.get(node, "v_bias")
    if v_up is None:  # absorbed: one latent value stream shared by every KV head
        return graph.call_function(aten.expand.default, (graph.call_function(aten.unsqueeze.default, (c_v, 1)),
                                                         [-1, num_kv_heads, -1, -1]))
    v = graph.call_function(aten.matmul.default, (c_v, v_up))
    if v_bias is not None:
        v = graph.call_function(aten.add.Tensor, (v, v_bias))
    v = graph.call_function(aten.unflatten.int, (v, -1, [num_kv_heads, -1]))
    return graph.call_function(aten.transpose.int, (v, 1, 2))
