"""GemFilter at run time: select prompt tokens with a graph truncated after layer r, then generate.

Based on arXiv:2409.17422 (``my_baseline/GemFilter/gem_filter_utils.py::find_context``). Pass 1
runs the step graph *truncated after layer r's attention inputs* (derived from the compiled
graph: its output is replaced by that layer's q and k, and dead-code elimination drops every later
layer and the LM head). The last prompt query scores every prompt key, pre-softmax, summed over
query heads (GQA: each query head reads its KV head), avg-pooled with ``kernel`` (zero padding
counted, as the reference's ``avg_pool1d``); the top ``keep`` ids are **sorted** back into prompt
order. Pass 2 runs the full graph on only those tokens with fresh positions 0..k-1 (RoPE recomputed
by the model) and generates normally.

    truncated(ids [B, T], positions, ...) -> (q [B, H, T, D], k [B, Hk, T, D])
    select(q, k, mask, keep, kernel) -> list of B LongTensors of kept prompt indices (ascending)
"""

from __future__ import annotations

import time

import torch

from ..codegen.lower import lower
from ..ops.gemfilter import ATTENTION_KINDS, kept_batch, kept_from_scores, select_tokens, selection_node, token_scores, truncate_after_layer  # noqa: F401  (re-exported: the selection maths lives in ops)
from .generate import check_prompt, positions_from_mask
from .inputs import check_length


@torch.inference_mode()
def gemfilter_select(cm, input_ids, attention_mask=None) -> list:
    """Kept prompt indices per row for a compiled model whose recipe has ``gemfilter``."""
    s = cm.step_graph.notes["gemfilter"]["settings"]
    input_ids, attention_mask = check_prompt(input_ids, attention_mask, cm.info.vocab_size)
    trunc = cm.__dict__.get("_gemfilter_truncated")
    if trunc is None:
        trunc = lower(truncate_after_layer(cm.step_graph.gm, s["layer"]), cm.backend_object)
        cm._gemfilter_truncated = trunc
    B, T = input_ids.shape
    state = cm.step_graph.init_state(B, input_ids.device)
    q, k = trunc(input_ids, positions_from_mask(attention_mask), torch.tensor([T - 1], device=input_ids.device), *state)
    return select_tokens(q, k, attention_mask, s["keep"], s["kernel"])


def gemfilter_generate(cm, input_ids, max_new_tokens: int = 32, attention_mask=None, **kwargs) -> torch.Tensor:
    """HF-like ids [B, T + n]: the original prompt, then tokens generated from the kept tokens only."""
    return filtered_generate(cm._runtime, cm.info, lambda ids, mask: gemfilter_select(cm, ids, mask),
                             input_ids, max_new_tokens, attention_mask, **kwargs)


def filtered_generate(runtime, info, select, input_ids, max_new_tokens: int = 32, attention_mask=None,
                      **kwargs) -> torch.Tensor:
    """Generate with ``runtime`` from the prompt tokens ``select(ids, mask)`` keeps (torch or ONNX selection)."""
    input_ids, attention_mask = check_prompt(input_ids, attention_mask, info.vocab_size)
    # the selection pass runs the whole prompt: its positions must exist too (generation then checks the kept ones)
    check_length(info, int(attention_mask.sum(dim=1).max()), 0, runtime.max_positions, kwargs.get("allow_long", False))
    t0 = time.perf_counter()
    kept = select(input_ids, attention_mask)
    select_s = time.perf_counter() - t0
    pad = info.pad_token_id if info.pad_token_id is not None else 0
    ids, mask = kept_batch(input_ids, kept, pad)
    out = runtime.generate(ids, max_new_tokens=max_new_tokens, attention_mask=mask, **kwargs)
    stats = runtime.last_stats
    stats["gemfilter"] = {"select_s": select_s, "prompt_tokens": attention_mask.sum(1).tolist(),
                          "kept_tokens": [len(k) for k in kept]}
    return torch.cat([input_ids, out[:, ids.shape[1]:]], dim=1)
