"""Sliding-window perplexity of a base HF model or a CompiledModel, scored identically.

The metric that matters is ΔPPL between a recipe and the dense base model on the same
tokens, so both models go through the same windows and the same float32 NLL; only the way
logits are obtained differs (HF forward with explicit ``position_ids`` vs ``cm.logits``).

``mode="window"`` follows the Hugging Face perplexity guide: windows of ``window`` tokens
advance by ``stride``; each window scores only the tokens not scored before (its last
``stride``, all of the first window), with the rest as context. ``mode="stream"`` scores the
same tokens but feeds each window through prefill (``prefix`` tokens) and then one decode step
per token, so KV-cache passes that act after prefill (eviction, compression) are exercised.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..runtime.continuation import score_continuation
from ..runtime.score import score_stream, token_nll
from .data import read_text


def _is_hf(model) -> bool:
    return isinstance(model, torch.nn.Module)


def encode_text(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` token ids of ``text`` as [1, N] (only a prefix of a long text is tokenised)."""
    if tokenizer is None:
        raise ValueError("perplexity over text needs a tokenizer (or pass input_ids= directly)")
    chars = max_tokens * 12  # generous: English runs ~4 characters per token
    ids = tokenizer(text[:chars], add_special_tokens=False).input_ids
    if len(ids) < max_tokens and chars < len(text):
        ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids[:max_tokens], dtype=torch.long)[None]


def windows(n_tokens: int, window: int, stride: int):
    """(begin, end, n_scored) per window, HF-guide style: each token is scored at most once.

    A window scores its last ``n_scored`` tokens and can score at most ``end - begin - 1`` (its first token
    has no context inside the window), so with ``stride == window`` each window's first token is not scored."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        n_new = min(end - prev_end, end - begin - 1)
        out.append((begin, end, n_new))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def _full_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL [1, T-1] from one forward over ``ids`` (no cache)."""
    if _is_hf(model):
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    else:
        logits = model.logits(ids)
    return token_nll(logits[:, :-1], ids[:, 1:])


@torch.inference_mode()
def _hf_stream_nll(model, ids: torch.Tensor, prefix_len: int, progress=None) -> torch.Tensor:
    """HF's own reference for ``score_stream``: prefill, then one token at a time with its DynamicCache."""
    from transformers import DynamicCache

    T = ids.shape[1]
    cache = DynamicCache(config=model.config)
    pos = torch.arange(T, device=ids.device)[None]
    out = model(input_ids=ids[:, :prefix_len], position_ids=pos[:, :prefix_len], past_key_values=cache, use_cache=True)
    n = min(prefix_len, T - 1)
    nll = [token_nll(out.logits[:, :n], ids[:, 1:n + 1])]
    for t in range(prefix_len, T - 1):
        out = model(input_ids=ids[:, t:t + 1], position_ids=pos[:, t:t + 1], past_key_values=cache, use_cache=True)
        nll.append(token_nll(out.logits[:, -1:], ids[:, t + 1:t + 2]))
        if progress is not None:
            progress.update(1)
    return torch.cat(nll, dim=1)


def perplexity(model_or_cm, tokenizer=None, text: str | None = None, path=None, input_ids=None,
               max_tokens: int = 4096, window: int = 512, stride: int = 256, mode: str = "window",
               prefix: int | None = None, progress: bool = True) -> dict:
    """Perplexity of ``model_or_cm`` (HF model or CompiledModel) on a text, as plain data.

    The tokens are ``input_ids`` if given (for tiny models without a tokenizer), else the first
    ``max_tokens`` tokens of ``text``, of the file at ``path``, or of the shipped novel.
    ``prefix`` (stream mode) is how many tokens of each window are prefilled before decoding;
    default ``window - stride``, so every token a later window scores goes through a decode step.

    Returns ``{"ppl", "nll", "tokens", "window", "stride", "mode", "prefix", "seconds"}`` where
    ``nll`` is the mean per-token NLL (nats) and ``tokens`` how many tokens were scored.
    """
    if mode not in ("window", "stream"):
        raise ValueError(f"mode must be 'window' or 'stream'; got {mode!r}")
    if not (isinstance(window, int) and window >= 2):
        raise ValueError(f"window must be an int >= 2; got {window!r}")
    if not (isinstance(stride, int) and 1 <= stride <= window):
        raise ValueError(f"stride must be an int in [1, window={window}]; got {stride!r}")
    if input_ids is None:
        tokenizer = tokenizer if tokenizer is not None else getattr(model_or_cm, "tokenizer", None)
        src = text if text is not None else read_text(path)
        input_ids = encode_text(tokenizer, src, max_tokens)
    else:
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        input_ids = (input_ids[None] if input_ids.dim() == 1 else input_ids)[:, :max_tokens]
    if input_ids.shape[0] != 1:
        raise ValueError(f"perplexity scores one sequence; got a batch of {input_ids.shape[0]}")
    n = input_ids.shape[1]
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score; got {n}")
    if prefix is None:
        prefix = max(1, window - stride)
    if mode == "stream" and not 1 <= prefix <= window:
        raise ValueError(f"prefix must be in [1, window={window}]; got {prefix}")
    if _is_hf(model_or_cm):
        model_or_cm.eval()

    wins = windows(n, window, stride)
    total = sum(k for *_, k in wins)
    t0 = time.perf_counter()
    nll_sum = 0.0
    with tqdm(total=total, unit="tok", desc=f"ppl ({mode})", disable=None if progress else True, leave=False) as bar:
        for begin, end, n_new in wins:
            ids = input_ids[:, begin:end]
            if mode == "window":
                nll = _full_nll(model_or_cm, ids)
                bar.update(n_new)
            else:
                p = min(prefix, ids.shape[1])
                before = bar.n
                if _is_hf(model_or_cm):
                    nll = _hf_stream_nll(model_or_cm, ids, p, bar)
                else:
                    nll = score_stream(model_or_cm, ids, p, bar)
                bar.update(max(0, n_new - (bar.n - before)))
            nll_sum += float(nll[0, -n_new:].double().sum())
    seconds = time.perf_counter() - t0
    mean = nll_sum / total
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total, "window": window, "stride": stride,
            "mode": mode, "prefix": prefix if mode == "stream" else None, "seconds": seconds}


def compare_perplexity(base, cm, tokenizer=None, base_result: dict | None = None, **kwargs) -> dict:
    """Perplexity of the base model and of ``cm`` on the same tokens, with the difference.

    Returns ``{"base": {...}, "compiled": {...}, "delta": ppl_compiled - ppl_base,
    "ratio": ppl_compiled / ppl_base}``; keyword arguments are those of ``perplexity``.
    ``base_result``: the base side's ``perplexity`` result from an earlier call with the same
    arguments (a sweep scores the base once).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(cm, "tokenizer", None)
    b = base_result if base_result is not None else perplexity(base, tokenizer, **kwargs)
    c = perplexity(cm, tokenizer, **kwargs)
    return {"base": b, "compiled": c, "delta": c["ppl"] - b["ppl"], "ratio": c["ppl"] / b["ppl"]}


def heldout_windows(tokenizer, n_windows: int = 8, window: int = 4096, path=None) -> list:
    """``n_windows`` consecutive, non-overlapping [1, window] token windows of the held-out part of the text.

    The held-out part is ``data.heldout_part`` (the last ~40% of the shipped novel, which no pass
    calibrates on); the novel's held-out part holds about 10 windows of 4,096 SmolLM2 tokens.
    """
    from .data import heldout_part

    if tokenizer is None:
        raise ValueError("heldout_windows needs a tokenizer (or give windows of token ids to long_perplexity)")
    if not (isinstance(n_windows, int) and n_windows >= 1 and isinstance(window, int) and window >= 3):
        raise ValueError(f"need n_windows >= 1 and window >= 3 (ints); got n_windows={n_windows!r}, window={window!r}")
    ids = encode_text(tokenizer, heldout_part(path), n_windows * window)
    if ids.shape[1] < n_windows * window:
        have = ids.shape[1] // window
        raise ValueError(f"the held-out text has {ids.shape[1]} tokens: room for {have} windows of {window}, not {n_windows}")
    return [ids[:, i * window:(i + 1) * window] for i in range(n_windows)]


def long_perplexity(model_or_cm, windows_ids, prefix: int = 2048, progress: bool = True, block: int | None = None) -> dict:
    """Streamed perplexity per window: prefill ``prefix`` tokens, then score every later token by a decode step.

    Only the tokens predicted by decode steps are scored (``window - prefix - 1`` per window), so a
    pass that evicts or compresses the cache acts on every scored token. Returns
    ``{"nll": [mean NLL per window], "ppl", "tokens", "prefix", "kv_bytes": [held after each window],
    "kv_bytes_dense": [...], "seconds"}``; the KV bytes are the compiled runtime's ``last_stats``
    after the window (None for a Hugging Face model).

    ``block``: score the continuation teacher-forced in steps of ``block`` tokens over the prefilled cache
    instead (``runtime.continuation.score_continuation``: the same scores for a CompiledModel whose graph only
    appends after the prompt step, e.g. SnapKV; graphs that evict later are refused); None: a decode step per token.

    Cost: one decode step per scored token (``block``: one step per ``block`` tokens). The suite's default (8 windows of 4,096, prefix
    2,048) is 16,376 decode steps per model, about 18 minutes at 15 decode tokens/s (an
    estimate for smollm2-135m on 2 CPU cores, not a measurement); size it with the window count
    and sizes.
    """
    if not windows_ids:
        raise ValueError("long_perplexity needs at least one window")
    T = windows_ids[0].shape[-1]
    if not (isinstance(prefix, int) and 1 <= prefix <= T - 2):
        raise ValueError(f"prefix must be an int in [1, window - 2 = {T - 2}] so that decode steps are scored; got {prefix!r}")
    if _is_hf(model_or_cm):
        if block is not None:
            raise ValueError("block= scores through a CompiledModel's cache; give a CompiledModel or block=None")
        model_or_cm.eval()
    nlls, kv, dense, t0 = [], [], [], time.perf_counter()
    with tqdm(total=len(windows_ids) * (T - prefix - 1), unit="tok", desc="long ppl (stream)", disable=None if progress else True,
              leave=False) as bar:
        for ids in windows_ids:
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
            if ids.shape[1] != T:
                raise ValueError(f"all windows must have the same length; got {ids.shape[1]} and {T}")
            if _is_hf(model_or_cm):
                nll = _hf_stream_nll(model_or_cm, ids, prefix, bar)
                stats = {}
            else:
                nll = (score_stream(model_or_cm, ids, prefix, bar) if block is None else
                       score_continuation(model_or_cm, ids, prefix, block=block, progress=bar))
                stats = model_or_cm.last_stats
            nlls.append(float(nll[0, prefix:].double().mean()))
            kv.append(stats.get("kv_bytes"))
            dense.append(stats.get("kv_bytes_dense"))
    mean = sum(nlls) / len(nlls)
    return {"nll": nlls, "ppl": math.exp(mean), "tokens": len(nlls) * (T - prefix - 1), "prefix": prefix, "window": T,
            "kv_bytes": kv, "kv_bytes_dense": dense, "block": block, "seconds": time.perf_counter() - t0}
