"""KVzip's score and budget allocation (arXiv 2505.23416): context reconstruction, question-agnostic.

KVzip prefills the context, then runs *replay* passes on top of that cache: the prompt
"\\n\\nRepeat the previous context exactly." (later chunks: "...the part of the previous context exactly,
starting with" + the previous chunk's last 8 tokens), the chat template's assistant suffix and the context
chunk itself (chunks of 2,048 tokens). At every layer, context KV pair j of KV head h scores

    s[h, j] = max over replay queries t and the g query heads of h of softmax_t(q_t . k / sqrt(d))[j]

where the softmax runs over the attention sinks (the first ``sinks`` positions before the chunk), the
chunk's KV and the replay tokens (causal). The replay's own KV is discarded afterwards. Tokens of the
context before the chunks (the chat template's prefix) are never scored (0); the sinks are always kept.
The budget is global over layers and KV heads (the bottom-k of every score is pruned), or, with
``layerwise``, the same per layer (bottom-k over the layer's heads). On a latent (``lowrank_kv``) layer one
row serves every KV head: its per-head scores are pooled by the max over heads (``pool_latent``) and the
layer takes part with one unit per token. This module is the maths, pure
torch; ``runtime/kvzip_replay.py`` runs the replay through the compiled model and compacts the
packed per-head cache; ``passes/kvzip.py`` is the pass.

Exact setting: a fraction budget >= 1.0 keeps everything (no replay runs). Tested
(``tests/ops/test_kvzip_ops.py``): ``replay_scores`` equals a loop oracle over (head, query, key);
``keep_sets`` equals a brute-force allocation (the subset of the budget's size with the largest score sum),
with latent layers (max over a loop of heads, then the brute force over tokens) among per-head layers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def replay_scores(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, sink_end: int, lo: int,
                  hi: int) -> Tensor:
    """[B, Hk, S] fp32 KVzip scores of one layer's keys.

    q [B, H, T, D] (replay queries, post-RoPE), k [B, Hk, S, D] (every key: the context cache and the
    replay tokens, dense per head), q_pos [B, T], k_pos [B, Hk, S] (-1: no key). A query attends to the
    keys at positions < ``sink_end`` (sinks), in [``lo``, ``hi``) (the chunk) and at or after its row's
    first replay position (the replay tokens), causally (k_pos <= q_pos); the score of a key is the
    maximum of its softmax weight over the queries and the g = H / Hk query heads of its KV head (query
    head i reads KV head i // g). Keys no query may attend score 0.
    """
    B, H, T, D = q.shape
    hk = k.shape[1]
    g = H // hk
    start = q_pos.min(dim=1).values[:, None, None, None]  # [B, 1, 1, 1]: the first replay position
    kp = k_pos[:, :, None, :]  # [B, Hk, 1, S]
    allowed = (kp >= 0) & ((kp < sink_end) | ((kp >= lo) & (kp < hi)) | (kp >= start)) & (kp <= q_pos[:, None, :, None])
    logits = torch.einsum("bkgtd,bksd->bkgts", q.float().reshape(B, hk, g, T, D), k.float()) * scale
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return p.amax(dim=(2, 3))


def pruned_count(total: int, budget_n: int, budget_f: float, per_head: int) -> int:
    """How many of ``total`` scored pairs are pruned: a fraction budget f prunes int(total x (1 - f)) (kvpress's
    int(numel x compression_ratio)); a token budget N keeps min(N, per_head) per head on average."""
    if budget_f:
        return max(0, int(total * (1.0 - budget_f)))
    return max(0, total - (total // per_head) * min(budget_n, per_head)) if per_head else 0


def pool_latent(scores: Tensor) -> Tensor:
    """[1, n] from a latent layer's [Hk, n] per-head scores: the max over its KV heads.

    A latent (``lowrank_kv``) row serves every KV head, so a token is kept or dropped for all heads at once.
    The max extends KVzip's own reduction (already a max over the replay queries and the g query heads of a
    KV head) to all H query heads that read the row; with a threshold it keeps exactly the union of the
    heads' sets, the rule every other scorer follows on latent layers (``eviction_common``)."""
    return scores.amax(dim=0, keepdim=True)


def keep_sets(scores: list[Tensor], sinks: int, budget_n: int, budget_f: float, layerwise: bool) -> list[Tensor]:
    """Per layer, an [R, n] bool keep set of one row from its [R, n] scores (position order).

    R is a layer's scored rows: its Hk KV heads, or 1 for a latent layer (``pool_latent``: one unit per
    token, as one head's pair is one unit). The first ``sinks`` positions score max + 1 (always kept).
    Global (``layerwise=False``): the bottom ``pruned_count`` of all layers' scores together are pruned,
    so layers and heads keep different counts; ``layerwise``: the same fraction per layer, bottom-k over
    its rows. Ties: the lower flat index (layer, row, position) is pruned first (stable sort)."""
    if not scores:
        return []
    top = max(float(s.max()) for s in scores) + 1.0
    marked = []
    for s in scores:
        s = s.float().clone()
        s[:, :sinks] = top
        marked.append(s)
    n = marked[0].shape[1]
    if layerwise:
        out = []
        for s in marked:
            drop = pruned_count(s.numel(), budget_n, budget_f, n)
            out.append(_bottom_k_kept(s.reshape(-1), drop).reshape(s.shape))
        return out
    flat = torch.cat([s.reshape(-1) for s in marked])
    kept = _bottom_k_kept(flat, pruned_count(flat.numel(), budget_n, budget_f, n))
    return [part.reshape(s.shape) for part, s in zip(kept.split([s.numel() for s in marked]), marked)]


def _bottom_k_kept(flat: Tensor, drop: int) -> Tensor:
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop > 0:
        keep[torch.sort(flat, stable=True).indices[:drop]] = False
    return keep
