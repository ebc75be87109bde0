"""Retrieval score per head (arXiv 2404.15574): how often a head's top attention is the needle token being copied.

Technique (ALGORITHMS-2 §1). Needle-in-a-haystack prompts come from ``graphwright.eval.niah``
(seeded; the shipped novel and RULER-noise haystacks; three needle templates). The model runs a
dense prefill and a greedy decode through its Hugging Face modules with an attention function
that also computes the last query row's attention logits in fp32 (softmax is monotone, so its
argmax is the argmax of the probabilities). At every step emitting token ``w`` and for every layer
and query head, ``j* = argmax_j A[j]``; when ``j*`` lies in the copy span ``[s, e)`` and
``prompt[j*] == w`` the head gets ``1 / (e - s)``. A sample counts only when the answer's ROUGE-1
recall against the gold activity is > 0.5; the score is the mean over the kept samples.

Deviations from the official code, said here once:

* the copy span is the needle's *answer* part (the activity words after the primer, which
  ``niah`` already puts in the prompt), located exactly from the generator's character offsets,
  not by the 0.9 token-set overlap search; so a head that copies every answer token scores 1;
* the first answer token is scored too (its attention row is the prefill's last query row);
  the official decode starts scoring at the second token;
* query heads of a GQA group are pooled to their KV head with ``max`` (or ``mean``: the ``pool``
  flag); the paper scores query heads only (the pooling is [unconfirmed] in the spec).

Hugging Face modules rather than the graphwright step graph: the step graph's attention op is a
fused SDPA that never exposes probabilities, and scoring must not change what is being scored.
Invariant tested: :func:`copy_hits` equals the per-(layer, head) Python loop
:func:`copy_hits_reference`, and on a synthetic attention tensor where head (0, 0) always
looks at the copied token it scores 1 and every other head 0.
"""

from __future__ import annotations

import contextlib
import re
import time

import torch

ATTN_NAME = "graphwright_argmax"
POOLS = ("max", "mean")


def copy_hits(argmax: torch.Tensor, prompt_ids: torch.Tensor, span: tuple[int, int], token: int) -> torch.Tensor:
    """[L, H] increments for one step: ``1 / (e - s)`` where ``argmax`` is in ``[s, e)`` and names ``token``."""
    s, e = span
    if not 0 <= s < e <= prompt_ids.numel():
        raise ValueError(f"copy span [{s}, {e}) must be non-empty and inside the prompt of {prompt_ids.numel()} tokens")
    inside = (argmax >= s) & (argmax < e)
    same = prompt_ids[argmax.clamp(0, prompt_ids.numel() - 1)] == token
    return (inside & same).to(torch.float64) / (e - s)


def copy_hits_reference(argmax, prompt_ids, span, token) -> torch.Tensor:
    """The slow loop of the official ``retrieval_calculate`` (top-1): the oracle for :func:`copy_hits`."""
    s, e = span
    out = torch.zeros(argmax.shape, dtype=torch.float64)
    for layer in range(argmax.shape[0]):
        for head in range(argmax.shape[1]):
            j = int(argmax[layer, head])
            if s <= j < e and int(prompt_ids[j]) == int(token):
                out[layer, head] += 1.0 / (e - s)
    return out


def pool_kv(scores: torch.Tensor, num_kv_heads: int, pool: str = "max") -> torch.Tensor:
    """[L, H] query-head scores -> [L, Hk]: query head h reads KV head h // (H / Hk) (HF ``repeat_kv`` order)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    L, H = scores.shape
    if num_kv_heads < 1 or H % num_kv_heads:
        raise ValueError(f"{H} query heads do not split into {num_kv_heads} KV-head groups")
    grouped = scores.reshape(L, num_kv_heads, H // num_kv_heads)
    return grouped.amax(-1) if pool == "max" else grouped.mean(-1)


def rouge1_recall(answer: str, gold: str) -> float:
    """Share of the gold answer's words (lower-cased, with repeats) found in ``answer``."""
    words = lambda t: re.findall(r"[a-z0-9]+", t.lower())  # noqa: E731
    gold_w, have = words(gold), words(answer)
    if not gold_w:
        return 0.0
    hits = 0
    for w in gold_w:
        if w in have:
            have.remove(w)
            hits += 1
    return hits / len(gold_w)


def last_rows_logits(query, key, scaling, rows: int, kwargs: dict, what: str, window: bool = True) -> torch.Tensor:
    """fp32 attention logits [B, H, rows, S] of the last ``rows`` query rows of an HF attention call against every
    key (GQA keys repeated to their query heads), unmasked. Refuses, naming ``what`` measures, the attention forms
    whose probabilities are not a plain softmax of these logits (softcap, sinks; a sliding window unless
    ``window``: the caller then masks with the call's own ``attention_mask``)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    if kwargs.get("softcap") is not None or kwargs.get("sinks") is not None or (not window and kwargs.get("sliding_window")):
        extra = "" if window else " or sliding window"
        raise ValueError(f"{what} supports plain softmax attention (no logit softcap, no attention sinks{extra})")
    k = repeat_kv(key, query.shape[1] // key.shape[1]).float()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return torch.einsum("bhad,bhsd->bhas", query[:, :, -rows:].float(), k) * scale


class _Recorder:
    """Collects, per forward, each layer's last-row attention argmax [H] (fp32 logits, causal/window mask applied)."""

    def __init__(self):
        self.rows: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        logits = last_rows_logits(query, key, scaling, 1, kwargs, "retrieval scoring")[:, :, 0]
        if attention_mask is not None:
            last = attention_mask[:, :, -1, : key.shape[2]]
            logits = logits.masked_fill(~last, float("-inf")) if last.dtype == torch.bool else logits + last.float()
        self.rows[module.layer_idx] = logits[0].argmax(-1)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    def take(self, num_layers: int) -> torch.Tensor:
        if len(self.rows) != num_layers:
            raise RuntimeError(f"recorded {len(self.rows)} of {num_layers} layers: the model's attention did not go through the hook")
        out = torch.stack([self.rows[i] for i in range(num_layers)])
        self.rows.clear()
        return out


@contextlib.contextmanager
def route_attention(model, name: str, fn):
    """Route the model's attention through ``fn`` (registered as ``name``) for the duration."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def answer_span(tokenizer, case: dict) -> tuple[int, int]:
    """Token span ``[s, e)`` of the needle's activity words in the case's prompt (exact, from character offsets)."""
    from graphwright.eval.niah import encode
    from graphwright.steer.spans import token_spans

    prompt = case["prompt"]
    enc = encode(tokenizer, prompt, return_offsets_mapping=True)
    n0 = prompt.index(case["activity"], prompt.index(case["city"]))  # the needle names the city before the activity
    return token_spans(enc.offset_mapping, [(n0, n0 + len(case["activity"]))])[0]


@torch.no_grad()
def score_case(model, tokenizer, case: dict, max_new_tokens: int = 24) -> dict:
    """Greedy answer for one NIAH case and its [L, H] query-head retrieval increments."""
    from graphwright.eval.niah import encode

    cfg = model.config
    L = cfg.num_hidden_layers
    ids = torch.tensor([encode(tokenizer, case["prompt"]).input_ids])
    prompt = ids[0]
    span = answer_span(tokenizer, case)
    rec = _Recorder()
    hits = torch.zeros(L, cfg.num_attention_heads, dtype=torch.float64)
    newline = set(tokenizer("\n", add_special_tokens=False).input_ids)
    out: list[int] = []
    with route_attention(model, ATTN_NAME, rec):
        res = model(input_ids=ids, use_cache=True)
        for _ in range(max_new_tokens):
            tok = int(res.logits[0, -1].argmax())
            hits += copy_hits(rec.take(L), prompt, span, tok)
            if tok == tokenizer.eos_token_id or tok in newline:
                break
            out.append(tok)
            res = model(input_ids=torch.tensor([[tok]]), cache=res.past_key_values, use_cache=True)
    answer = tokenizer.decode(out, skip_special_tokens=True)
    return {"hits": hits, "answer": answer, "recall": rouge1_recall(answer, case["activity"]), "span": span}


def retrieval_scores(model, tokenizer, cases: list, pool: str = "max", max_new_tokens: int = 24,
                     min_recall: float = 0.5, progress: bool = True) -> dict:
    """Mean retrieval score over the kept cases (ROUGE-1 recall > ``min_recall``), per query head and pooled to KV heads."""
    from tqdm.auto import tqdm

    if tokenizer is None:
        raise ValueError("retrieval scoring needs the model's tokenizer (tiny random models have none); use e.g. smollm2-135m")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    cfg = model.config
    t0 = time.perf_counter()
    total = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
    kept, rows = 0, []
    for case in tqdm(cases, desc="retrieval heads", unit="case", disable=not progress, leave=False):
        r = score_case(model, tokenizer, case, max_new_tokens)
        keep = r["recall"] > min_recall
        if keep:
            total += r["hits"]
            kept += 1
        rows.append({"id": case["id"], "length": case["length"], "depth": case["depth"], "answer": r["answer"],
                     "recall": r["recall"], "kept": keep})
    if kept == 0:
        raise ValueError(f"no case had ROUGE-1 recall > {min_recall}: the model never copied the needle, so no head can be scored")
    per_query = total / kept
    kv = pool_kv(per_query, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, pool)
    return {"query_scores": per_query, "scores": kv, "kept": kept, "cases": len(cases), "rows": rows,
            "seconds": time.perf_counter() - t0}
