"""Lowering transform: attention nodes whose layer keeps a running attention score get ``attention_sdpa_scored``.

H2O and FastGen add each decode step's attention probabilities to a per-slot score; their layer's
attention computes those probabilities explicitly once and hands them over (``decode_probs.py``).
Every other decode over per-head slots (StreamingLLM, SnapKV, sliding windows) needs only the
output, which SDPA computes faster (no fp32 probability tensor, no mask when every slot is visible).
The choice is static, per layer: an attention node is scored when its ``k_pos`` argument also feeds an
``evict_h2o``, ``evict_fastgen``, ``evict_scored_acc``, ``evict_scissorhands`` node, or an ``evict_scored``
node with ``scorer="tova"`` (the eviction op of the same layer reads the same positions; ``policy_slots.py``).
An H2O layer with token-count budgets also passes ``full_at = heavy + recent``: once every row is that
long, its decode steps see every slot valid and build no visibility mask (``attention_sdpa_scored``).

Tested (``tests/passes/test_eviction_slots.py``): the lowered torch graph of an H2O/FastGen recipe
calls ``attention_sdpa_scored`` in every layer and a StreamingLLM/SnapKV one in none; kept sets and
logits of every slot policy equal the references.
"""

from __future__ import annotations

import torch

from ...capture.ops import ATTENTION
from ...ops import schema
from ...ops.eviction import EVICT_FASTGEN, EVICT_H2O, EVICT_SCISSORHANDS, EVICT_SCORED, EVICT_SCORED_ACC
from .attention import attention_sdpa_scored

SCORED_POLICIES = (EVICT_H2O, EVICT_FASTGEN, EVICT_SCORED_ACC, EVICT_SCISSORHANDS)


def _reads_probabilities(node: torch.fx.Node) -> bool:
    """An eviction node that reads the step's attention probabilities at decode (``policy_slots.py`` too:
    cumulative attention, Scissorhands' indicators, TOVA's last-query attention)."""
    if node.target in SCORED_POLICIES:
        return True
    return node.target == EVICT_SCORED and schema.get(node, "scorer") == "tova"


def scored_attention(graph: torch.fx.Graph) -> None:
    """Point every attention node whose ``k_pos`` feeds a running-score eviction op at ``attention_sdpa_scored``."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target != ATTENTION:
            continue
        k_pos = schema.get(node, "k_pos")
        users = [u for u in k_pos.users if _reads_probabilities(u)] if isinstance(k_pos, torch.fx.Node) else []
        if users:
            node.target = attention_sdpa_scored
            c = _h2o_count(users)
            if c:
                node.kwargs = {**node.kwargs, "full_at": c}


def _h2o_count(users) -> int:
    """heavy + recent of the layer's one H2O op with token-count budgets (its cache holds exactly that many
    tokens per head once every row is that long), else 0."""
    if len(users) != 1 or users[0].target != EVICT_H2O:
        return 0
    a = {n: schema.get(users[0], n) for n in ("heavy_n", "heavy_f", "recent_n", "recent_f")}
    if any(not isinstance(x, (int, float)) for x in a.values()) or a["heavy_f"] or a["recent_f"]:
        return 0
    return int(a["heavy_n"]) + int(a["recent_n"])
