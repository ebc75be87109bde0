"""Needle attention mass per head: how much of its attention a head puts on the needles while the model answers.

Technique: the query-focused retrieval score of QRHead (arXiv 2506.09944) -- a head's attention mass from a
query to the text that answers it, summed over the gold spans -- taken at the rows that matter to a KV cache
that is compressed once and then decoded: the model's own greedy answer. For every case (RULER-style
``niah_multivalue`` prompts from :mod:`graphwright.eval.ruler`, seeds from ``seed + 1``; the evaluation uses 0)
the model answers greedily; then one pass over prompt + answer (one pass, not the answer over a cache: a multi-row
step over a Hugging Face cache through a custom attention function gets no mask, and SDPA's causal mask is then
aligned top-left) records, for every layer and query head::

    mass = mean over answer rows of  sum over needle positions j of  softmax(q K^T * scale)[j]

The needle positions are each reference value's tokens plus the ``NEEDLE_BEFORE`` (16) tokens ahead of it (the key
phrase "One of the special magic numbers for <key> is:") and ``NEEDLE_AFTER`` (2) behind. A head that spreads its
attention evenly over the prompt puts ``|needles| / T`` there by chance; the case's score is the mass above
that share. Query heads of a GQA group are averaged to their KV head (a mass is a share of one softmax, so
the mean stays a share); the head set's score is the mean over cases, clipped at 0.

Why this and not the copy score of :mod:`graphwright.heads.retrieval_score` (arXiv 2404.15574): on smollm2-135m
the heads that read the needles while the model lists several values (layer 7 head 2, 14/1, 15/2, 8/0) include
heads that never *copy* a token, so their copy score is 0 and head-score shares leave them 88-146 tokens; their
answer-time attention then lands on evicted needle tokens (measured on case c10 of the 2k multi-value cell:
0.25 of L14h1's answer-row mass, 0.22 of L7h2's). Deviations from QRHead, said here once: the rows are the
answer's (QRHead: the query's), the spans are the synthetic needles (QRHead: gold documents of real tasks), the
chance share is subtracted, and GQA groups are pooled by the mean.

Hugging Face modules rather than the step graph, for the reason ``retrieval_score`` gives (the fused attention
op never exposes probabilities). Invariant tested: :func:`needle_mass` equals the per-(head, row, key) loop
:func:`needle_mass_reference`; a head that attends only to the needles scores 1 - |needles| / T and uniform
attention scores 0.
"""

from __future__ import annotations

import re
import time

import torch

from .retrieval_score import last_rows_logits, pool_kv, route_attention

ATTN_NAME = "graphwright_needle_mass"
NEEDLE_BEFORE, NEEDLE_AFTER = 16, 2  # tokens around each value that count as its needle (the key phrase, the period)


def needle_mass(probs: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """[H] mean over query rows of the attention mass on ``needles``: probs [H, A, S] (rows sum to 1), needles
    a bool [T] over the first T <= S keys (the prompt)."""
    T = needles.numel()
    return probs[..., :T][..., needles].sum(-1).mean(-1)


def needle_mass_reference(probs: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """The loop over heads, rows and keys: the oracle for :func:`needle_mass`."""
    H, A, _ = probs.shape
    out = torch.zeros(H, dtype=torch.float64)
    for h in range(H):
        for a in range(A):
            out[h] += sum(float(probs[h, a, j]) for j in range(needles.numel()) if bool(needles[j])) / A
    return out


def needle_positions(tokenizer, prompt: str, references, before: int = NEEDLE_BEFORE, after: int = NEEDLE_AFTER) -> torch.Tensor:
    """bool [T] over the prompt's tokens: the tokens of each reference value (its first whole-word occurrence in
    ``prompt``, with the one space before it, located exactly by the tokenizer's character offsets) widened by
    ``before`` tokens ahead and ``after`` behind."""
    from graphwright.eval.niah import encode
    from graphwright.steer.spans import token_spans

    enc = encode(tokenizer, prompt, return_offsets_mapping=True)
    mask = torch.zeros(len(enc.input_ids), dtype=torch.bool)
    for ref in references:
        m = re.search(rf"(?<![0-9A-Za-z]){re.escape(ref)}(?![0-9A-Za-z])", prompt)
        if m is None:
            raise ValueError(f"reference {ref!r} is not in the prompt; needle mass needs each value written in the prompt")
        c0 = m.start() - (m.start() > 0 and prompt[m.start() - 1] == " ")
        [(s, e)] = token_spans(enc.offset_mapping, [(c0, m.end())])
        mask[max(0, s - before):e + after] = True
    return mask


class _MassRecorder:
    """Per forward over prompt + answer, each layer's [H] needle mass over the last ``answer_rows`` query rows
    (fp32 softmax, causal)."""

    def __init__(self, needles: torch.Tensor, answer_rows: int):
        self.needles, self.answer_rows, self.rows = needles, answer_rows, {}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        logits = last_rows_logits(query, key, scaling, self.answer_rows, kwargs, "needle mass", window=False)[0]
        A, S = logits.shape[1:]
        causal = torch.arange(S)[None, :] <= (S - A) + torch.arange(A)[:, None]
        self.rows[module.layer_idx] = needle_mass(logits.masked_fill(~causal, float("-inf")).softmax(-1), self.needles)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@torch.no_grad()
def score_case(model, tokenizer, case: dict, max_new_tokens: int = 32) -> dict:
    """Greedy answer for one case and its [L, H] query-head needle mass above the chance share."""
    from graphwright.eval.niah import encode
    from graphwright.eval.ruler import string_match_all

    ids = torch.tensor([encode(tokenizer, case["prompt"]).input_ids])
    T = ids.shape[1]
    needles = needle_positions(tokenizer, case["prompt"], case["references"])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    answer_ids = out[:, T:]
    rec = _MassRecorder(needles, answer_ids.shape[1])
    with route_attention(model, ATTN_NAME, rec):  # one pass over prompt + answer: the recorder reads the answer's rows
        model(input_ids=out, use_cache=False)
    L = model.config.num_hidden_layers
    if len(rec.rows) != L:
        raise RuntimeError(f"recorded {len(rec.rows)} of {L} layers: the model's attention did not go through the hook")
    mass = torch.stack([rec.rows[i] for i in range(L)]).double()
    answer = tokenizer.decode(answer_ids[0], skip_special_tokens=True)
    return {"mass": mass, "chance": float(needles.sum()) / T, "answer": answer,
            "score": string_match_all(answer, case["references"]), "needle_tokens": int(needles.sum())}


def needle_mass_scores(model, tokenizer, cases: list, max_new_tokens: int = 32, progress: bool = True) -> dict:
    """Mean over ``cases`` of each head's needle mass above chance, per query head and pooled (mean) to KV heads."""
    from tqdm.auto import tqdm

    if tokenizer is None:
        raise ValueError("needle mass needs the model's tokenizer (tiny random models have none: pass ByteTokenizer()); "
                         "use e.g. smollm2-135m")
    if not cases:
        raise ValueError("needle mass needs at least one case")
    cfg = model.config
    t0 = time.perf_counter()
    total = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
    rows = []
    for case in tqdm(cases, desc="needle mass", unit="case", disable=not progress, leave=False):
        r = score_case(model, tokenizer, case, max_new_tokens)
        total += r["mass"] - r["chance"]
        rows.append({"id": case["id"], "length": case["length"], "answer": r["answer"], "score": r["score"],
                     "needle_tokens": r["needle_tokens"], "chance": round(r["chance"], 4)})
    per_query = total / len(cases)
    kv = pool_kv(per_query, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, "mean").clamp(min=0.0)
    return {"query_scores": per_query, "scores": kv, "cases": len(cases), "rows": rows, "seconds": time.perf_counter() - t0}
