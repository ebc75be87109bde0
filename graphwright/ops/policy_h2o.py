"""H2O as an eviction policy (arXiv 2306.14048): reference ``eviction_ref.h2o_reference``.

Reads q (scores are cumulative attention); carries one fp32 score per slot (state
``attn_score<layer>``); budgets ``heavy``/``recent`` as count + fraction of the length.
"""

from __future__ import annotations

import torch

from .eviction_policy import EvictionPolicy, Param, SlotState, register_policy
from .eviction_ref import h2o_reference

H2O_POLICY = EvictionPolicy(
    name="h2o",
    reference=h2o_reference,
    slot_state=(SlotState("score", torch.float32, state="attn_score"),),
    params=(Param("heavy_n", "int"), Param("heavy_f", "float"), Param("recent_n", "int"), Param("recent_f", "float")),
    doc="H2O: keep the last ``recent`` tokens and the top ``heavy`` by cumulative attention.",
)
EVICT_H2O = register_policy(H2O_POLICY)
