"""Slow loop oracles of the KV scorers and of the generic op's selection (ALGORITHMS-2 §6), plus a caller."""

from __future__ import annotations

import math

import torch

from graphwright.ops.policy_scored import SCORED_ACC_POLICY, SCORED_POLICY, SCORED_ROPE_POLICY
from tests.passes.eviction_helpers import probs_oracle

DEFAULTS = dict(scorer="knorm", when="decode", every=0, slack=0, budget_n=0, budget_f=0.0, sinks=0, window=0, kernel=1,
                smooth="avg", pool="mean", chunk=0, chunk_heads="sum", beta=0.0, layer=0, num_layers=1, n_future=512,
                eps=0.0, rope_scaling=1.0, window_f=0.0)


def call_op(q, k, v, q_pos, k_pos, scale=0.35, state=None, inv_freq=None, **params):
    """The registered generic op (plain, cumulative-state or rotary variant) with DEFAULTS overridden."""
    values = dict(DEFAULTS, **params)
    policy = SCORED_ACC_POLICY if state is not None else SCORED_ROPE_POLICY if inv_freq is not None else SCORED_POLICY
    args = dict(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, scale=scale, **values)
    if state is not None:
        args["score"] = state
    if inv_freq is not None:
        args["inv_freq"] = inv_freq
    return policy.op(**args)


def prefill_step(B=2, H=4, Hk=2, T=12, D=8, pad=(0, 3), seed=0):
    """A random prompt step: q [B, H, T, D], k, v [B, Hk, T, D], row b left-padded by pad[b]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * 1.5
    k = torch.randn(B, Hk, T, D, generator=g) * torch.rand(B, Hk, T, 1, generator=g).add(0.5)
    v = torch.randn(B, Hk, T, D, generator=g)
    q_pos = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        q_pos[b, pad[b]:] = torch.arange(T - pad[b])
    return q, k, v, q_pos, q_pos[:, None].expand(B, Hk, T).clone()


def kept(k_pos):
    return [[sorted(int(p) for p in row if p >= 0) for row in heads] for heads in k_pos]


def select_oracle(score, k_pos, q_pos, budget_n=0, budget_f=0.0, sinks=0, window=0):
    """[B][Hk] kept positions: sinks + window + the top (budget - protected) by (-score, slot)."""
    B, Hk, S = k_pos.shape
    out = []
    for b in range(B):
        L = max(int(p) for p in q_pos[b]) + 1
        cap = budget_n + math.floor(budget_f * L + 1e-9)
        rows = []
        for h in range(Hk):
            slots = [s for s in range(S) if k_pos[b, h, s] >= 0]
            prot = [s for s in slots if k_pos[b, h, s] < sinks or k_pos[b, h, s] >= L - window]
            cand = [s for s in slots if s not in prot]
            n = max(cap - len(prot), 0)
            best = sorted(cand, key=lambda s: (-float(score[b][h][s]), s))[:n]
            rows.append(sorted(int(k_pos[b, h, s]) for s in prot + best))
        out.append(rows)
    return out


def knorm_oracle(k):
    B, Hk, S, D = k.shape
    return [[[-math.sqrt(sum(float(k[b, h, s, d]) ** 2 for d in range(D))) for s in range(S)] for h in range(Hk)] for b in range(B)]


def keydiff_oracle(k, k_pos):
    B, Hk, S, D = k.shape
    out = []
    for b in range(B):
        rows = []
        for h in range(Hk):
            slots = [s for s in range(S) if k_pos[b, h, s] >= 0]
            a = [0.0] * D
            for s in slots:
                n = math.sqrt(sum(float(x) ** 2 for x in k[b, h, s]))
                a = [ai + float(x) / n / len(slots) for ai, x in zip(a, k[b, h, s])]
            na = math.sqrt(sum(x * x for x in a))
            rows.append([-sum(float(x) * y for x, y in zip(k[b, h, s], a)) / (na * float(k[b, h, s].norm())) for s in range(S)])
        out.append(rows)
    return out


def tova_oracle(q, k, q_pos, k_pos, scale):
    P = probs_oracle(q, k, q_pos, k_pos, scale)  # [B, H, T, S]
    B, H, T, S = P.shape
    Hk = k.shape[1]
    row = [[sum(float(P[b, h, T - 1, s]) for h in range(H)) / H for s in range(S)] for b in range(B)]
    return [[row[b] for _ in range(Hk)] for b in range(B)]


def snapkv_oracle(q, k, q_pos, k_pos, scale, window, kernel):
    """Window attention mass (mean over g), evictable keys only (positions < L - window), avg-pooled."""
    P = probs_oracle(q, k, q_pos, k_pos, scale)
    B, H, T, S = P.shape
    Hk = k.shape[1]
    g = H // Hk
    out = []
    for b in range(B):
        L = max(int(p) for p in q_pos[b]) + 1
        rows = []
        for hk in range(Hk):
            raw = [sum(float(P[b, hk * g + j, t, s]) for j in range(g) for t in range(T - window, T)) / g
                   if 0 <= k_pos[b, hk, s] < L - window else 0.0 for s in range(S)]
            r = kernel // 2
            rows.append([sum(raw[s + d] for d in range(-r, r + 1) if 0 <= s + d < S) / kernel for s in range(S)])
        out.append(rows)
    return out


def rotation_matrix(p, inv_freq, D, scaling):
    """R(p) [D, D] of the rotate-half convention: R x = scaling * (x cos + rotate_half(x) sin) on 2*len(inv_freq) dims."""
    R = torch.eye(D, dtype=torch.float64)
    half = len(inv_freq)
    for i in range(half):
        a = p * float(inv_freq[i])
        c, s = math.cos(a), math.sin(a)
        # out[i] = x[i] c - x[i+half] s ; out[i+half] = x[i+half] c + x[i] s
        R[i, i], R[i, i + half], R[i + half, i + half], R[i + half, i] = c, -s, c, s
    R[:2 * half, :2 * half] *= scaling
    return R


def expected_attention_oracle(q, k, v, q_pos, k_pos, scale, inv_freq, scaling, sinks, n_future, eps=0.0):
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    out = []
    for b in range(B):
        L = max(int(p) for p in q_pos[b]) + 1
        Rbar = sum(rotation_matrix(p, inv_freq, D, scaling) for p in range(L, L + n_future)) / n_future
        rows = []
        p_heads = []
        for h in range(H):
            pre = [torch.linalg.solve(rotation_matrix(int(q_pos[b, t]), inv_freq, D, scaling), q[b, h, t].double())
                   for t in range(T) if q_pos[b, t] >= sinks]
            mu = sum(pre) / len(pre)
            sigma = sum(torch.outer(x - mu, x - mu) for x in pre) / len(pre)
            mu_r, sigma_r = Rbar @ mu, Rbar @ sigma @ Rbar.T
            z = {s: scale * float(k[b, h // g, s].double() @ mu_r)
                 + 0.5 * scale ** 2 * float(k[b, h // g, s].double() @ sigma_r @ k[b, h // g, s].double())
                 for s in range(S) if k_pos[b, h // g, s] >= sinks}
            m = max(z.values())
            tot = sum(math.exp(x - m) for x in z.values())
            p_heads.append({s: math.exp(x - m) / tot for s, x in z.items()})
        for hk in range(Hk):
            rows.append([(sum(p_heads[hk * g + j].get(s, 0.0) for j in range(g)) / g + eps) * float(v[b, hk, s].norm())
                         for s in range(S)])
        out.append(rows)
    return out


def chunk_oracle(score, k_pos, q_pos, budget_n, chunk, head_sum):
    """ChunkKV: chunk mean of the (head-summed) score over positions; top max(1, n // chunk) chunks."""
    B, Hk, S = k_pos.shape
    out = []
    for b in range(B):
        means = []
        for h in range(Hk):
            m = {}
            for s in range(S):
                if k_pos[b, h, s] >= 0:
                    m.setdefault(int(k_pos[b, h, s]) // chunk, []).append(float(score[b][h][s]))
            means.append({c: sum(x) / len(x) for c, x in m.items()})
        rows = []
        for h in range(Hk):
            ms = {c: sum(mm.get(c, 0.0) for mm in means) for c in means[h]} if head_sum else means[h]
            n = sum(1 for s in range(S) if k_pos[b, h, s] >= 0)
            if budget_n >= n:
                rows.append(sorted(int(p) for p in k_pos[b, h] if p >= 0))
                continue
            top = sorted(ms, key=lambda c: (-ms[c], c))[:max(1, budget_n // chunk)]
            rows.append(sorted(int(p) for p in k_pos[b, h] if p >= 0 and int(p) // chunk in top))
        out.append(rows)
    return out
