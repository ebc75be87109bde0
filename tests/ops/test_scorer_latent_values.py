"""Expected Attention (arXiv 2510.00636) and CriticalKV (arXiv 2502.03805) on a latent (``lowrank_kv``) layer:
the registered ``evict_scored_rope_values`` op against explicitly decompressed per-head values (a loop over
rows, heads and tokens), the per-head oracle sets merged into one set per token, and the exact setting;
CriticalKV's value-output norm of the latent rows through the absorbed o_proj against decompressed values
through the original o_proj."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops.eviction_ref import row_length
from graphwright.ops.latent_attention import rebuild_keys
from graphwright.ops.policy_scored import SCORED_ROPE_VALUES_POLICY
from graphwright.ops.rope_index_ref import _rotate, rope_angles
from graphwright.ops.scorers.base import ScoreInputs
from graphwright.ops.scorers.criticalkv import output_values, value_output_norm
from graphwright.ops.scorers.expected_attention import expected_attention_score
from graphwright.passes.lowrank_rewrite import _absorbed_o
from tests.ops.scorer_oracles import DEFAULTS, expected_attention_oracle, kept, prefill_step, select_oracle

SCALE, D, HK, PAD = 0.35, 8, 2, (0, 3)


def latent_layer(bias: bool, seed: int = 3, T: int = 14, r_k: int = 6, r_v: int = 5):
    """Post-RoPE queries, the latent rows and factors of one layer, and its latent keys rebuilt per head."""
    q, _, _, q_pos, k_pos = prefill_step(D=D, T=T, seed=7, pad=PAD)
    g = torch.Generator().manual_seed(seed)
    c_k, c_v = torch.randn(2, T, r_k, generator=g), torch.randn(2, T, r_v, generator=g)
    c_v = c_v * torch.rand(2, T, 1, generator=g).add(0.3)  # tokens of different value size
    k_up, v_up = torch.randn(r_k, HK * D, generator=g) / 2, torch.randn(r_v, HK * D, generator=g)
    v_bias = torch.randn(HK * D, generator=g) if bias else torch.zeros(0)
    inv_freq = 1.0 / (100 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_angles(q_pos, inv_freq)
    q = _rotate(q, cos[:, None], sin[:, None], 1.0)
    k = rebuild_keys(c_k, k_up, None, k_pos[:, 0], inv_freq, 1.0, D)  # what latent_keys gives the op
    return q, k, c_k, c_v, v_up, v_bias, q_pos, k_pos, inv_freq


def decompressed_values(c_v, v_up, v_bias):
    """V [B, Hk, S, D]: c_v[b, j] @ v_up[:, head h's columns] (+ bias) in a loop over rows, heads and tokens."""
    B, S, _ = c_v.shape
    V = torch.zeros(B, HK, S, D)
    for b in range(B):
        for h in range(HK):
            for j in range(S):
                x = c_v[b, j] @ v_up[:, h * D:(h + 1) * D]
                V[b, h, j] = x + v_bias[h * D:(h + 1) * D] if v_bias.numel() else x
    return V


@pytest.mark.parametrize("bias", [True, False])
def test_latent_scores_equal_decompressed_values_and_sets_are_the_heads_union(bias):
    q, k, c_k, c_v, v_up, v_bias, q_pos, k_pos, inv_freq = latent_layer(bias)
    payload = torch.cat([c_k, c_v], -1)[:, None]  # [B, 1, S, r_k + r_v]: one row per token for every head
    V = decompressed_values(c_v, v_up, v_bias)
    common = dict(q=q, k=k, q_pos=q_pos, k_pos=k_pos, scale=SCALE, cand=k_pos >= 0, length=row_length(q_pos),
                  inv_freq=inv_freq, sinks=2, n_future=16)
    latent = expected_attention_score(ScoreInputs(v=payload, v_up=v_up, v_bias=v_bias, **common))
    dense = expected_attention_score(ScoreInputs(v=V, **common))
    assert torch.allclose(latent, dense, rtol=1e-5, atol=1e-7)
    # the op: per head, the explicit oracle's top-k over decompressed values; the latent row is kept if any head keeps it
    params = dict(DEFAULTS, scorer="expected_attention", when="prefill", budget_n=6, sinks=2, n_future=16)
    out = SCORED_ROPE_VALUES_POLICY.op(q=q, k=k, v=payload, q_pos=q_pos, k_pos=k_pos, inv_freq=inv_freq, v_up=v_up,
                                       v_bias=v_bias, scale=SCALE, **params)
    score = expected_attention_oracle(q, k, V, q_pos, k_pos, SCALE, inv_freq, 1.0, 2, 16)
    per_head = select_oracle(score, k_pos, q_pos, 6, sinks=2)
    union = [sorted(set(rows[0]) | set(rows[1])) for rows in per_head]
    assert per_head[0][0] != per_head[0][1]  # the heads disagree: the union is not one head's set
    assert kept(out[2]) == [[u] * HK for u in union]
    for b, positions in enumerate(union):
        assert len(positions) < 14 - PAD[b]  # rows were dropped
        slots = [p + PAD[b] for p in positions]
        assert torch.equal(out[1][b, 0, :len(slots)], payload[b, 0, slots])  # the kept latent rows


def test_latent_exact_budget_keeps_every_row():
    q, k, c_k, c_v, v_up, v_bias, q_pos, k_pos, inv_freq = latent_layer(True)
    payload = torch.cat([c_k, c_v], -1)[:, None]
    params = dict(DEFAULTS, scorer="expected_attention", when="prefill", budget_n=14, sinks=4, n_future=16)
    out = SCORED_ROPE_VALUES_POLICY.op(q=q, k=k, v=payload, q_pos=q_pos, k_pos=k_pos, inv_freq=inv_freq, v_up=v_up,
                                       v_bias=v_bias, scale=SCALE, **params)
    assert kept(out[2]) == kept(k_pos)  # every real row kept (left padding is compacted away)
    for b in range(2):
        assert torch.equal(out[1][b, 0, :14 - PAD[b]], payload[b, 0, PAD[b]:])


def test_criticalkv_latent_rows_through_the_absorbed_o_proj_equal_decompressed_values():
    q, k, c_k, c_v, v_up, _, q_pos, k_pos, _ = latent_layer(False)
    H, hidden = q.shape[1], 12
    wo = torch.randn(hidden, H * D, generator=torch.Generator().manual_seed(5))
    absorbed = _absorbed_o(wo, None, v_up, None, H, HK)[0].float()  # [hidden, H * r_v], as lowrank_kv folds it
    payload = torch.cat([c_k, c_v], -1)[:, None]
    x = ScoreInputs(q=q, k=k, v=payload, q_pos=q_pos, k_pos=k_pos, scale=SCALE, cand=k_pos >= 0,
                    length=row_length(q_pos), wo=absorbed)
    got = value_output_norm(output_values(x), absorbed)
    V = decompressed_values(c_v, v_up, torch.zeros(0))
    want = torch.zeros(2, HK, 14)
    g = H // HK
    for b in range(2):
        for h in range(H):  # query head h reads KV head h // g: ||V W_O,h^T||_1 averaged over the g heads
            for j in range(14):
                want[b, h // g, j] += float((V[b, h // g, j] @ wo[:, h * D:(h + 1) * D].T).abs().sum()) / g
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    dense = ScoreInputs(q=q, k=k, v=V, q_pos=q_pos, k_pos=k_pos, scale=SCALE, cand=k_pos >= 0, length=row_length(q_pos),
                        wo=wo)
    assert output_values(dense) is V  # a dense layer's values pass through
