"""Finch scorer (Corallo & Papotti, TACL 2024, doi 10.1162/tacl_a_00716; kvpress ``FinchPress``): SnapKV whose
observation window is the question.

The prompt is context + question, and the question's ``window`` tokens (the prompt's last ones) are the
observation window; they are always kept. Rule: each window row's softmax attention (over every visible key,
as the model attends) is multiplied by the number of keys before its query, which is the query's position
p = L - window + i (kvpress's "non-zero attention weights" count, ``arange(k_len - window, k_len)``: it undoes
the dilution of a longer row); the rows are averaged, then the g query heads of a KV head (``pool``: mean,
kvpress's, or max); no 1-D pooling. The top (budget - window - sinks) context tokens of each KV head are kept
(ties: the earliest). ``chunk=N``: Finch's chunked selection (kvpress ``chunk_length``, not ChunkKV): chunk c
holds positions [cN, (c+1)N) and keeps max(1, floor(n_c x budget / L)) of its n_c tokens, its window and sink
tokens first (always kept, even where they exceed the chunk's share), then its top scores.

How the window is known: ``evict(score="finch", budget=B, window=Q)``, Q the question's token count (required:
a default would silently score with the context's own tail). A reusable context (``cm.prefill``) has no
question, so it is refused with a Finch recipe; compress context + question as one prompt. Prefill only.
Positions: by default kept keys stay at their original positions (the twin of ``FinchPress(rerotate_keys=False)``,
bench/kvpress_worker.py); ``rerotate=True`` is kvpress's default ``rerotate_keys=True``: the kept keys move to
positions 0..n-1 and later tokens follow at n (``passes/evict_rerotate.py``, ``ops/rerotate.py``).
Exact setting: budget >= prompt length (every token kept).
Invariant tested (``tests/ops/test_finch.py``): the op's kept sets equal a slow loop oracle on random attention,
chunked too; budget >= length keeps everything; ``evict(score="finch")`` composes with ``lowrank_kv`` and ``steer``
(``tests/passes/test_evict_finch.py``).
"""

from __future__ import annotations

import torch

from ..eviction_ref import prob_blocks, topk_mask
from .base import ScoreInputs, Scorer, gqa_reduce


def finch_score(x: ScoreInputs):
    """[B, Hk, S]: the question rows' attention, each row times its query position, mean over rows and g heads."""
    T = x.q.shape[2]
    w = min(max(x.window, 1), T)
    out = None
    for t0, p in prob_blocks(x.q, x.k, x.q_pos, x.k_pos, x.scale, None, rows=(T - w, T)):
        n = x.q_pos[:, t0:t0 + p.shape[3]].clamp(min=0).to(p.dtype)  # [B, t] keys before each query (padding: 0)
        part = (p * n[:, None, None, :, None]).sum(dim=3)
        out = part if out is None else out + part
    return gqa_reduce(out / w, x.pool).masked_fill(~x.cand, 0.0)


def finch_chunk_keep(score, x: ScoreInputs, protected, cap, chunk: int):
    """[B, Hk, S] bool chosen candidates, chunk by chunk: chunk c keeps max(1, n_c * cap // L) tokens, its
    protected ones (window, sinks) counted first; ``cap`` [B] the row's budget."""
    valid = x.k_pos >= 0
    cid = torch.where(valid, x.k_pos // chunk, torch.full_like(x.k_pos, -1))
    chosen = torch.zeros_like(valid)
    for c in range(int(cid.max()) + 1 if cid.numel() else 0):
        inside = cid == c
        n_c = inside.sum(-1)  # [B, Hk]
        share = torch.where(n_c > 0, (n_c * cap[:, None] // x.length[:, None]).clamp(min=1), torch.zeros_like(n_c))
        count = (share - (protected & inside).sum(-1)).clamp(min=0)
        chosen |= topk_mask(score, x.cand & inside, count)
    return chosen


# why a reusable context is refused with a Finch recipe (CompiledModel and the ONNX OnnxModel say the same)
CONTEXT_REFUSAL = ("evict(score='finch') scores with the question (its observation window), which a reusable context "
                   "does not hold; compress context + question as one prompt: "
                   "m.generate(torch.cat([context_ids, question_ids], 1)) with window=question_ids.shape[1]")


FINCH = Scorer("finch", finch_score, "doi 10.1162/tacl_a_00716",
               "question-window attention x query position, mean over rows and heads", "budget >= prompt length",
               prefill_only=True, gqa_pool=True, chunked=finch_chunk_keep)
