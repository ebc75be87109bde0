"""Expected Attention (arXiv 2510.00636; kvpress ``presses/expected_attention_press.py``).

Rule: future queries are modelled as Gaussian. From the prompt's *pre-RoPE* queries at positions
>= n_sink (``sinks``) take mu [B, H, D] and the population covariance Sigma [B, H, D, D] (fp32).
Average the rotation over the next ``n_future`` positions, Rbar = mean_{p=L}^{L+n_f-1} R(p)
(R(p) x = scaling * (x cos(p) + rotate_half(x) sin(p)) on the rotary dims, the model's convention;
L = the row's length), mu' = Rbar mu, Sigma' = Rbar Sigma Rbar^T. For each query head and cached
key j >= n_sink: z_j = scale * mu'.k_j + scale^2 * k_j^T Sigma' k_j / 2 (= log E[exp(scale q.k)],
scale = 1/sqrt(D)); p = softmax_j(z), mean over the g heads of a KV head (``pool``);
s_j = (p_j + eps) * ||v_j||_2. Sinks are always kept (the op's ``sinks``).
Defaults: n_future 512, n_sink 4, eps 0 (covariance and value norm on). After prefill only.

Pre-RoPE queries: the graph holds the post-RoPE q of the prompt (after any q-norm), so they are
recovered by the inverse rotation at their known positions with the layer's own rotary table
(``rope_index_ref.rope_invert_reference``, exact up to ~1e-7 in fp32), not re-projected with q_proj.
Rbar is linear in cos/sin, so it is the rotation with cos and sin averaged over the n_f positions.
Exact setting: budget >= prompt length. Latent (``lowrank_kv``) layers: ``v`` is the shared payload
[B, 1, S, r_k + r_v] (one row per token for every KV head), so the per-head norm is taken of the value the
layer really attends to, V_h = c_v B_V,h + b_V,h, rebuilt from the payload's c_v columns with the layer's
value up-projection (``x.v_up``, the ``evict_scored_rope_values`` op; kept as a parameter by ``lowrank_kv``
in both value paths); keys are the latent keys rebuilt per head, and the layer keeps the union of its
heads' sets like every scorer there.
Invariant tested: kept set equals an oracle with explicit sums for mu, Sigma and a loop over p
building R(p) as a D x D matrix (``tests/ops/test_scorers.py``); on a latent payload the scores equal those
of explicitly decompressed per-head values, head by head (``tests/ops/test_scorer_latent_values.py``).
"""

from __future__ import annotations

import torch

from ..latent_attention import rebuild_values
from ..rope_index_ref import _rotate, rope_angles, rope_invert_reference
from .base import ScoreInputs, Scorer, gqa_reduce


def mean_rotation(length: torch.Tensor, n_future: int, inv_freq, scaling: float, D: int) -> torch.Tensor:
    """[B, D, D] M with M = Rbar^T: x @ M is Rbar x for row vectors x."""
    pos = length[:, None] + torch.arange(n_future, device=length.device)  # [B, n_f]
    cos, sin = rope_angles(pos, inv_freq)  # [B, n_f, R]
    eye = torch.eye(D, device=length.device)[None].expand(length.shape[0], D, D)
    return _rotate(eye[:, None], cos.mean(1)[:, None, None], sin.mean(1)[:, None, None], scaling)[:, 0]


def expected_attention_score(x: ScoreInputs):
    B, H, T, D = x.q.shape
    Hk = x.k.shape[1]
    q_pre = rope_invert_reference(x.q.float(), x.q_pos, x.inv_freq, x.rope_scaling)  # [B, H, T, D]
    rows = (x.q_pos >= x.sinks).float()[:, None, :, None]  # real prompt rows after the sinks
    n = rows.sum(dim=2).clamp(min=1)  # [B, 1, 1]
    mu = (q_pre * rows).sum(dim=2) / n  # [B, H, D]
    c = (q_pre - mu[:, :, None]) * rows
    sigma = c.transpose(-1, -2) @ c / n[..., None]  # [B, H, D, D]
    M = mean_rotation(x.length, x.n_future, x.inv_freq, x.rope_scaling, D)[:, None]  # [B, 1, D, D]
    mu_r = (mu[:, :, None] @ M)[:, :, 0]  # [B, H, D]
    sigma_r = M.transpose(-1, -2) @ sigma @ M
    g = H // Hk
    k = x.k.float().repeat_interleave(g, dim=1)  # [B, H, S, D]
    z = x.scale * (k @ mu_r[..., None])[..., 0] + 0.5 * x.scale ** 2 * ((k @ sigma_r) * k).sum(-1)
    ok = ((x.k_pos >= 0) & (x.k_pos >= x.sinks)).repeat_interleave(g, dim=1)
    p = torch.softmax(z.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    p = gqa_reduce(p.view(B, Hk, g, -1), x.pool)
    return (p + x.eps) * value_norms(x)


def value_norms(x: ScoreInputs) -> torch.Tensor:
    """[B, Hk, S] fp32 ||v_j|| per KV head; on a latent layer (``x.v_up`` given) of V = c_v B_V + b_V rebuilt
    from the payload's last r_v columns (c_v)."""
    if x.v_up is None:
        return x.v.float().norm(dim=-1)
    r_v = x.v_up.shape[0]
    bias = x.v_bias if x.v_bias is not None and x.v_bias.numel() else None
    return rebuild_values(x.v[:, 0, :, -r_v:], x.v_up, bias, x.k.shape[1]).norm(dim=-1)


EXPECTED_ATTENTION = Scorer("expected_attention", expected_attention_score, "arXiv 2510.00636",
                            "(E[softmax] under N(mu, Sigma) of rotated future queries + eps) * ||v||", "budget >= prompt length",
                            rope=True, prefill_only=True, gqa_pool=True, default_sinks=4)
