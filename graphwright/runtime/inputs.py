"""Checks on what a caller hands the runtime: prompt ids, the attention mask, the length it asks for.

Each check raises ``ValueError`` naming the argument, what it got and what is allowed, before any
step runs (a bad mask or length would otherwise give wrong logits or fail deep inside torch).

* ``attention_mask``: a tensor of the prompt's shape holding only 0 and 1 (bool, integer or float
  dtype), left-padded (zeros before ones), at least one 1 per row. Positions are the running count
  of ones, so a 0.5 or a 2 would silently shift or erase positions.
* length: the last position a generation reaches must exist in the model: the longest row's real
  tokens plus ``max_new_tokens`` may not exceed ``ModelInfo.max_positions`` (``max_position_embeddings``
  / ``n_positions``). ``allow_long=True`` lifts this for rotary models (RoPE extrapolates, quality
  past the trained length is not guaranteed: a warning says so); models with a learned position
  table (GPT-2 and kin) have no row past the table, so they refuse even then. A graph whose
  attention sees only cache-relative positions on every layer (``streaming`` on all layers) has
  no such limit (``limit=None``).
"""

from __future__ import annotations

import warnings

import torch

# model types whose positions index a learned table (nn.Embedding of max_positions rows)
LEARNED_POSITION_TYPES = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "xglm"})


def check_attention_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor:
    """The mask as a LongTensor of 0/1 [B, T]; ``ValueError`` unless it is a 0/1 left-padded tensor of ``input_ids``' shape."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch tensor of 0s and 1s shaped like input_ids; got {type(attention_mask).__name__}")
    if attention_mask.dim() == 1 and input_ids.shape[0] == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {list(input_ids.shape)}; "
                         "it needs one 0/1 entry per prompt token")
    if attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask must have a bool, integer or float dtype; got {attention_mask.dtype}")
    if attention_mask.dtype != torch.bool:
        bad = ~((attention_mask == 0) | (attention_mask == 1))  # NaN is neither
        if bool(bad.any()):
            shown = ", ".join(sorted({f"{float(v):g}" for v in attention_mask[bad].flatten()[:1000].tolist()})[:5])
            raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token); got value(s) {shown} "
                             f"(dtype {str(attention_mask.dtype).replace('torch.', '')}); pass a bool or 0/1 tensor")
    mask = attention_mask.long()
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("every row of attention_mask needs at least one real (1) token")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left-padded (zeros before ones in each row)")
    return mask


def check_length(info, prompt_tokens: int, max_new_tokens: int, limit, allow_long: bool = False) -> None:
    """``ValueError`` when ``prompt_tokens + max_new_tokens`` positions exceed ``limit`` (the model's
    ``max_positions``; None = no limit); with ``allow_long`` a rotary model only warns."""
    if not isinstance(allow_long, bool):
        raise ValueError(f"allow_long must be True or False; got {allow_long!r}")
    total = prompt_tokens + max_new_tokens
    if limit is None or total <= limit:
        return
    what = (f"prompt ({prompt_tokens} tokens, longest row) + max_new_tokens ({max_new_tokens}) = {total} positions "
            f"exceeds the model's max_positions {limit} ({info.architecture})")
    learned = getattr(info, "model_type", None) in LEARNED_POSITION_TYPES
    if learned:
        raise ValueError(f"{what}; its learned position table has {limit} rows, so nothing past position {limit - 1} "
                         "can run: shorten the prompt or lower max_new_tokens")
    if not allow_long:
        raise ValueError(f"{what}; shorten the prompt or lower max_new_tokens, or pass allow_long=True to run past the "
                         "trained length anyway (rotary positions extrapolate; quality is not guaranteed), or compile "
                         "with streaming(...), whose positions stay within its cache")
    warnings.warn(f"{what}; running past the trained length because allow_long=True (quality not guaranteed)", stacklevel=3)


def position_limit(info, recipe_entries, notes: dict | None = None) -> int | None:
    """The position limit of a compiled graph: ``info.max_positions``, or None when a ``streaming`` entry of
    ``recipe_entries`` (a recipe's ``to_list()``), or the graph's own ``streaming`` notes (a pass run
    directly), cover every layer (attention then sees cache indices only)."""
    per_layer = ((notes or {}).get("streaming") or {}).get("per_layer") or {}
    if info.num_layers and len(per_layer) >= info.num_layers:
        return None
    for entry in recipe_entries or ():
        if isinstance(entry, dict) and entry.get("pass") == "streaming" and entry.get("layers") is None:
            return None
    return info.max_positions
