"""Lower a step graph's graphwright ops to a backend's implementations.

``cm.graph`` keeps the graphwright ops (what passes, inspection and export read). The runtime
runs a lowered copy whose op nodes call the backend's functions directly. Backends are data: a
table from op to implementation, so adding one (Triton, ...) is a new table, not a new pipeline.
"""

from __future__ import annotations

import copy

import torch

from ..capture.ops import ATTENTION, MOE_EXPERTS, attention_reference, moe_experts_reference
from ..ops.fused_moe import FUSED_MOE, fused_moe_reference
from ..ops.eviction import REFERENCES as EVICTION_REFERENCES
from ..ops.latent_attention import LATENT_ATTENTION, latent_attention_reference
from ..ops.block_sparse import BLOCK_SPARSE_ATTENTION, block_sparse_reference
from ..ops.page_summary import PAGE_SUMMARY, page_summary_incremental, page_summary_reference
from .torch.attention import attention_sdpa
from .torch.cache_append import cache_append
from .torch.latent_attention import latent_attention_sdpa
from .torch.block_sparse import block_sparse_sdpa
from .torch.moe import fused_moe_auto, fused_moe_sorted, fused_moe_triton
from .triton import TRITON_OVERRIDES

BACKEND_TABLES = {
    "reference": {ATTENTION: attention_reference, MOE_EXPERTS: moe_experts_reference,
                  LATENT_ATTENTION: latent_attention_reference, FUSED_MOE: fused_moe_reference,
                  BLOCK_SPARSE_ATTENTION: block_sparse_reference, PAGE_SUMMARY: page_summary_reference,
                  **EVICTION_REFERENCES},
    "torch": {ATTENTION: attention_sdpa, MOE_EXPERTS: moe_experts_reference,
              LATENT_ATTENTION: latent_attention_sdpa,
              BLOCK_SPARSE_ATTENTION: block_sparse_sdpa, PAGE_SUMMARY: page_summary_incremental,
              # a dict = one implementation per node.meta["graphwright"]["impl"] (set by fuse_moe(impl=...))
              FUSED_MOE: {"auto": fused_moe_auto, "sorted": fused_moe_sorted, "triton": fused_moe_triton},
              **EVICTION_REFERENCES},
}
# Triton: the torch table with attention / latent / block-sparse attention and MoE on Triton kernels
BACKEND_TABLES["triton"] = {**BACKEND_TABLES["torch"], **TRITON_OVERRIDES}


def lower(gm: torch.fx.GraphModule, backend: str = "torch") -> torch.fx.GraphModule:
    """A copy of ``gm`` whose graphwright op nodes call ``backend``'s implementations."""
    if backend not in BACKEND_TABLES:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKEND_TABLES)}")
    table = BACKEND_TABLES[backend]
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if backend == "torch" and _is_state_append(node):
            node.target, node.args, node.kwargs = cache_append, (*node.args[0], _cat_dim(node)), {}
        elif node.op == "call_function" and node.target in table:
            impl = table[node.target]
            if isinstance(impl, dict):
                impl = impl[node.meta.get("graphwright", {}).get("impl") or "auto"]
            node.target = impl
    out = torch.fx.GraphModule(gm, graph)
    out.recompile()
    return out


def _cat_dim(node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def _is_state_append(node) -> bool:
    """``cat([state input, new], dim)``: a cache growing by this step's entries (see cache_append)."""
    if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
        return False
    parts = node.args[0]
    return len(parts) == 2 and isinstance(parts[0], torch.fx.Node) and parts[0].op == "placeholder"
