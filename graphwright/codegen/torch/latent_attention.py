"""Torch-backend latent attention (LoRC): rebuild K (and V) in the model dtype, then SDPA.

Same semantics as ``graphwright.ops.latent_attention.latent_attention_reference`` (tested against
it). In absorbed mode the single latent value stream [B, S, r_v] is broadcast to every KV head
with ``expand`` (a view, no copy) so SDPA's GQA path can attend over it. The key RMSNorm
(``k_norm``) runs in fp32 inside ``rebuild_keys``; ``key_bias`` and ``sinks`` go to
``attention_sdpa`` unchanged.
"""

from __future__ import annotations

from ...ops.latent_attention import rebuild_keys, rebuild_values
from .attention import attention_sdpa


def latent_attention_sdpa(q, c_k, c_v, k_up, k_bias, v_up, v_bias, q_pos, k_pos, inv_freq, rope_scaling, scale,
                          window=0, key_bias=None, sinks=0, k_norm=None, k_norm_eps=1e-6):
    k = rebuild_keys(c_k, k_up, k_bias, k_pos, inv_freq, rope_scaling, q.shape[-1], k_norm, k_norm_eps).to(q.dtype)
    if v_up is not None:
        v = rebuild_values(c_v, v_up, v_bias, k.shape[1]).to(q.dtype)
    else:
        v = c_v[:, None].expand(k.shape[0], k.shape[1], c_v.shape[1], c_v.shape[2]).to(q.dtype)
    return attention_sdpa(q, k, v, q_pos, k_pos, scale, window, key_bias, sinks)
