"""Score a sequence through the runtime's own prefill + decode steps (streaming NLL).

Full-prompt logits (``Runtime.logits``) come from one prefill step, so a pass that compresses
or evicts the KV cache *after* prefill never touches them. ``score_stream`` instead prefills a
prefix and then feeds every remaining token through a decode step with the cache the runtime
threads, exactly as ``generate`` would: the scores then reflect what the compressed cache
really remembers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .generate import positions_from_mask, state_bytes
from .held_bytes import held_bytes
from .inputs import check_length
from .rerotate import continued


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in float32: logits [B, N, V], targets [B, N] -> [B, N]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None]).squeeze(-1)


def _runtime_of(runtime_or_cm):
    rt = getattr(runtime_or_cm, "_runtime", runtime_or_cm)
    if not (hasattr(rt, "step") and hasattr(rt, "specs")):
        raise TypeError(f"score_stream needs a CompiledModel or Runtime; got {type(runtime_or_cm).__name__}")
    return rt


def scoring_start(rt, input_ids: torch.Tensor, prefix_len: int, allow_long: bool, name: str):
    """Checked ``(ids [B, T] long, squeezed, empty state, positions [B, T])`` for scoring T tokens after a
    ``prefix_len`` prompt step (``score_stream``, ``continuation.score_continuation``); ``ValueError`` otherwise."""
    squeeze = input_ids.dim() == 1
    ids = (input_ids[None] if squeeze else input_ids).long()
    B, T = ids.shape
    if T < 2:
        raise ValueError(f"{name} needs at least 2 tokens; got {T}")
    if not 1 <= prefix_len <= T:
        raise ValueError(f"prefix_len must be in [1, {T}]; got {prefix_len}")
    check_length(rt.info, T - 1, 0, getattr(rt, "max_positions", rt.info.max_positions), allow_long)
    state = [s.empty(B, ids.device) for s in rt.specs]
    return ids, squeeze, state, torch.arange(T, device=ids.device).expand(B, T)


@torch.inference_mode()
def score_stream(runtime_or_cm, input_ids: torch.Tensor, prefix_len: int, progress=None, allow_long: bool = False) -> torch.Tensor:
    """NLL of tokens 1..T-1 of ``input_ids`` [B, T] (or [T]) scored as prefill + decode.

    The first ``prefix_len`` tokens are one prefill step (logits for all of them); each later
    token is one decode step at its absolute position. Returns [B, T-1] float32 (or [T-1]),
    where entry ``t`` is -log p(input_ids[t+1] | input_ids[:t+1]). ``progress`` is an optional
    tqdm bar advanced once per decoded token. Afterwards the runtime's ``last_stats`` holds
    ``kv_bytes`` (the cache held after the last step, T-1 tokens fed), ``kv_bytes_dense`` and
    ``kv_fraction``, as after ``generate``. The T - 1 fed positions must fit the model's ``max_positions``
    (``allow_long``: as in ``Runtime.generate``).
    """
    rt = _runtime_of(runtime_or_cm)
    ids, squeeze, state, positions = scoring_start(rt, input_ids, prefix_len, allow_long, "score_stream")
    B, T = ids.shape
    device = ids.device

    logits, state = rt.step(ids[:, :prefix_len], positions[:, :prefix_len],
                            torch.arange(prefix_len, device=device), state)
    positions = continued(rt, state, positions, prefix_len)  # evict(..., rerotate=True): later tokens from n
    n = min(prefix_len, T - 1)  # the prefix's last logits predict token prefix_len (if any)
    nll = [token_nll(logits[:, :n], ids[:, 1:n + 1])]
    zero = torch.zeros(1, dtype=torch.long, device=device)
    for t in range(prefix_len, T - 1):
        logits, state = rt.step(ids[:, t:t + 1], positions[:, t:t + 1], zero, state)
        nll.append(token_nll(logits[:, -1:], ids[:, t + 1:t + 2]))
        if progress is not None:
            progress.update(1)
    out = torch.cat(nll, dim=1)
    kv = state_bytes(state, rt.specs)
    dense = rt.info.dense_kv_bytes_per_token() * B * (T - 1)
    rt.last_stats = {"batch": B, "prompt_tokens": prefix_len * B, "scored_tokens": (T - 1) * B, "decode_steps": max(0, T - 1 - prefix_len),
                     "kv_bytes": kv, **held_bytes(state, rt.specs), "kv_bytes_dense": dense, "kv_fraction": kv / dense if dense else 0.0,
                     "source": "score_stream"}
    return out[0] if squeeze else out


@torch.inference_mode()
def stream_logits(step, specs, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefill: int, extras: dict | None = None,
                  rerotated_layers=None):
    """Teacher-forced prefill + decode through ``step``, threading the state as ``Runtime.generate`` does.

    ``input_ids``/``attention_mask`` [B, T] (left padding only inside the first ``prefill`` columns):
    one prefill step over the first ``prefill`` tokens with logits at every position, then one decode
    step per later token at its absolute position (``logits_index`` [0], state fed back), so a pass
    that evicts after prefill or at decode acts on every later step. Returns ``(logits [B, T, V],
    final state)``; logits[:, t] predicts token t + 1. ``rerotated_layers`` (``evict(..., rerotate=True)``): the later
    tokens continue at the kept count n (``runtime/rerotate.py``), as the runtime feeds them.
    """
    extras = extras or {}
    B, T = input_ids.shape
    if not 1 <= prefill <= T:
        raise ValueError(f"prefill must be in [1, {T}]; got {prefill}")
    if not bool(attention_mask[:, prefill:].bool().all()):
        raise ValueError("attention_mask may hold padding (0) only inside the prefill columns")
    device = input_ids.device
    positions = positions_from_mask(attention_mask)
    state = [s.empty(B, device) for s in specs]
    logits, state = step(input_ids[:, :prefill], positions[:, :prefill], torch.arange(prefill, device=device), state, **extras)
    positions = continued(None, state, positions, prefill, rerotated_layers, specs)
    out = [logits]
    zero = torch.zeros(1, dtype=torch.long, device=device)
    for t in range(prefill, T):
        logits, state = step(input_ids[:, t:t + 1], positions[:, t:t + 1], zero, state, **extras)
        out.append(logits[:, -1:])
    return torch.cat(out, dim=1), state
