"""GemFilter's selection (arXiv:2409.17422): a graph truncated after layer r, and the token choice.

Pure functions over graphs and tensors, below passes, codegen and runtime (the pass validates
the layer, ONNX export translates the truncated graph, the runtime runs it); the run-time flow is
``graphwright/runtime/gemfilter.py``.

    truncated(ids [B, T], positions, ...) -> (q [B, H, T, D], k [B, Hk, T, D])
    select(q, k, mask, keep, kernel) -> list of B LongTensors of kept prompt indices (ascending)
"""

from __future__ import annotations

import torch

from ..capture.ops import ATTENTION
from .block_sparse import BLOCK_SPARSE_ATTENTION

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
