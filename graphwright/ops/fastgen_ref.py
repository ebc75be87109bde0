"""Pure-torch reference of FastGen's per-head profiling and decode-time policies (arXiv 2310.01801).

Policies form a ladder (ids 0..4 = ``LADDER``), each keeping the union of the previous ones and
one more set: special tokens, punctuation, the ``frequent`` top tokens by cumulative attention,
the ``local`` most recent tokens, everything (full).

What a query sees under a policy is exactly what decode will show it: the kept set of the cache
*plus itself* (a new token is always attended once before the policy may drop it). So profiling
counts a query's own column in every policy, and ``local`` at query position i covers keys with
i - j <= w, the w most recent cached tokens a decode step leaves behind (w = local budget).
"""

from __future__ import annotations

import torch

from .eviction_ref import LADDER, PUNCT, SPECIAL, budget, colsum, compact, prob_blocks, row_length, topk_mask

FULL = len(LADDER) - 1


def fastgen_profile(q, k, q_pos, k_pos, token_class, scale, local_n, local_f, frequent_n, frequent_f,
                    key_bias=None):
    """Recovered attention mass per ladder policy over the prompt.

    Returns ``(rec, score)``: rec [B, Hk, 5] fp32 = mean over real prompt query rows and the g query
    heads of the attention mass a policy keeps (full = 1); score [B, Hk, S] = column sums (the
    cumulative attention the frequent policy ranks by, also H2O's score).
    """
    B, H, T, _ = q.shape
    Hk = k.shape[1]
    g = H // Hk
    score = colsum(q, k, q_pos, k_pos, scale, key_bias)
    n = row_length(q_pos)
    valid = k_pos >= 0
    frequent = topk_mask(score, valid, budget(frequent_n, frequent_f, n))
    w = budget(local_n, local_f, n).view(B, 1, 1, 1, 1)
    special = token_class == SPECIAL
    sets = [special, special | (token_class == PUNCT)]
    sets.append(sets[1] | frequent)
    kp = k_pos[:, :, None, None, :]  # [B, Hk, 1, 1, S]
    mass = torch.zeros(B, Hk, FULL, dtype=torch.float32, device=q.device)
    for t0, p in prob_blocks(q, k, q_pos, k_pos, scale, key_bias):  # p [B, Hk, g, t, S]
        qp = q_pos[:, None, None, t0:t0 + p.shape[3], None]
        me = kp == qp  # the query's own slot
        local = (qp - kp) <= w  # with causality (p = 0 beyond the query) this is the recent window
        masks = [s[:, :, None, None, :] | me for s in sets] + [sets[2][:, :, None, None, :] | local]
        for i, m in enumerate(masks):
            mass[..., i] += (p * m).sum(dim=(2, 3, 4))
    rec = mass / (n.view(B, 1, 1).float() * g)
    rec = torch.cat([rec, torch.ones(B, Hk, 1, device=q.device)], dim=-1)
    return rec, score


def fastgen_choose(rec, recovery: float, criterion: str, force: str) -> torch.Tensor:
    """[B, Hk] long: the cheapest policy reaching ``recovery`` (``force``: one policy for every head).

    ``criterion="mass"``: kept mass m >= recovery. ``"l1"``: the paper's |A - A_C|_1 <= 1 - recovery,
    which for a renormalised restriction equals 2(1 - m) (averaged over rows, linear in m).
    ``recovery >= 1`` means full everywhere (float round-off must not pick a lossy policy).
    """
    B, Hk, _ = rec.shape
    if force:
        return torch.full((B, Hk), LADDER.index(force), dtype=torch.long, device=rec.device)
    if recovery >= 1.0:
        return torch.full((B, Hk), FULL, dtype=torch.long, device=rec.device)
    ok = rec >= recovery if criterion == "mass" else 2.0 * (1.0 - rec) <= 1.0 - recovery
    ok[..., FULL] = True
    return ok.to(torch.int8).argmax(dim=-1)  # the first (cheapest) policy that recovers enough


def fastgen_keep(policy, token_class, score, k_pos, length, local_n, local_f, frequent_n, frequent_f):
    """[B, Hk, S] bool: slots kept by each head's policy at current length ``length`` [B]."""
    valid = k_pos >= 0
    p = policy.view(*policy.shape[:2], 1)
    frequent = topk_mask(score, valid, budget(frequent_n, frequent_f, length))
    # the w most recent tokens, the current one included
    local = (length[:, None, None] - 1 - k_pos) < budget(local_n, local_f, length)[:, None, None]
    keep = ((token_class == SPECIAL) | ((p >= 1) & (token_class == PUNCT)) | ((p >= 2) & frequent)
            | ((p >= 3) & local) | (p >= FULL))
    return keep & valid


def fastgen_reference(q, k, v, q_pos, k_pos, score, token_class, new_class, policy, scale, recovery,
                      local_n, local_f, frequent_n, frequent_f, criterion, force, key_bias=None):
    """One step of FastGen for one layer. -> (k, v, k_pos, score, token_class, policy [B, Hk, 1]).

    ``policy`` [B, Hk, 0] marks prefill: every head is profiled once on the prompt and its policy
    id becomes state ([B, Hk, 1]) that later steps follow. ``new_class`` [B, T] int8 classifies the
    step's tokens (special / punctuation / other) from the tokenizer-derived table.
    """
    B, Hk, S = k.shape[:3]
    T = q.shape[2]
    cls = torch.cat([token_class.to(torch.int8), new_class.to(torch.int8)[:, None, :].expand(B, Hk, T)], dim=2)
    if policy.shape[-1] == 0:
        rec, score = fastgen_profile(q, k, q_pos, k_pos, cls, scale, local_n, local_f, frequent_n, frequent_f, key_bias)
        pol = fastgen_choose(rec, recovery, criterion, force)
    else:
        score = torch.cat([score.float(), score.new_zeros(B, Hk, S - score.shape[2])], dim=2)
        score = score + colsum(q, k, q_pos, k_pos, scale, key_bias)
        pol = policy[..., 0]
    keep = fastgen_keep(pol, cls, score, k_pos, row_length(q_pos), local_n, local_f, frequent_n, frequent_f)
    k, v, k_pos, score, cls = compact(keep, k, v, k_pos, (score, cls))
    return k, v, k_pos, score, cls, pol[..., None]
