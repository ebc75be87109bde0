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

from ..capture.ops import ATTENTION
from ..ops.block_sparse import BLOCK_SPARSE_ATTENTION
from .generate import check_prompt, positions_from_mask

ATTENTION_KINDS = (ATTENTION, BLOCK_SPARSE_ATTENTION)


def selection_node(gm, layer: int):
    """Layer ``layer``'s single attention node, or the reason there is none usable."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_KINDS
             and n.meta.get("graphwright", {}).get("layer") == layer]
    if len(nodes) != 1:
        return f"layer {layer} has {len(nodes)} graphwright attention nodes; GemFilter reads q and k of exactly one"
    return nodes[0]


def truncate_after_layer(gm: torch.fx.GraphModule, layer: int) -> torch.fx.GraphModule:
    """A copy of ``gm`` returning ``(q, k)`` of layer ``layer``'s attention; later layers are dead code."""
    node = selection_node(gm, layer)
    if isinstance(node, str):
        raise ValueError(node)
    graph = torch.fx.Graph()
    env = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda x: env[x])
        if n is node:
            break
    graph.output((env[node.args[0]], env[node.args[1]]))
    graph.erase_node(env[node])
    graph.eliminate_dead_code()
    graph.lint()
    return torch.fx.GraphModule(gm, graph)  # copies only the parameters the kept layers read


def token_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, S] pre-softmax scores of the last query against every key, summed over query heads."""
    B, H, T, D = q.shape
    Hk = k.shape[1]
    q_last = q[:, :, -1].float().view(B, Hk, H // Hk, D)
    return torch.einsum("bkgd,bksd->bs", q_last, k.float())


def select_tokens(q, k, attention_mask, keep: int, kernel: int = 5) -> list:
    """Per row, the ascending indices (into the padded prompt) of the ``keep`` best real tokens."""
    return kept_from_scores(token_scores(q, k), attention_mask, keep, kernel)


def kept_from_scores(scores, attention_mask, keep: int, kernel: int = 5) -> list:
    """Pool each row's scores over its real tokens and keep the top ``keep`` ids, in prompt order."""
    out = []
    for b in range(scores.shape[0]):
        real = attention_mask[b].nonzero().flatten()
        s = scores[b, real][None, None].float()
        if kernel > 1:
            s = torch.nn.functional.avg_pool1d(s, kernel, stride=1, padding=kernel // 2)
        s = s.flatten()[: real.numel()]
        n = min(keep, real.numel())
        out.append(real[s.topk(n).indices.sort().values])
    return out


def kept_batch(input_ids, kept: list, pad_id: int):
    """Left-padded ``(ids, mask)`` of the kept tokens of every row."""
    n = max(len(k) for k in kept)
    ids = torch.full((len(kept), n), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    for b, idx in enumerate(kept):
        ids[b, n - len(idx):] = input_ids[b, idx]
        mask[b, n - len(idx):] = 1
    return ids, mask


@torch.inference_mode()
def gemfilter_select(cm, input_ids, attention_mask=None) -> list:
    """Kept prompt indices per row for a compiled model whose recipe has ``gemfilter``."""
    s = cm.step_graph.notes["gemfilter"]["settings"]
    input_ids, attention_mask = check_prompt(input_ids, attention_mask, cm.info.vocab_size)
    trunc = cm.__dict__.get("_gemfilter_truncated")
    if trunc is None:
        from ..codegen.lower import lower

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
