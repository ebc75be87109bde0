"""FastGen as an eviction policy (arXiv 2310.01801): reference ``fastgen_ref.fastgen_reference``.

Reads q. Per-slot state: cumulative ``score`` fp32 (state ``attn_score<layer>``) and ``token_class``
int8; per-step input ``new_class`` [B, T] int8 (the pass looks the step's ids up in a
tokenizer-derived table once for all layers); per-head state ``policy`` [B, Hk, 1] long (state
``fastgen_policy<layer>``, empty before prefill: that is how the op knows to profile).
"""

from __future__ import annotations

import torch

from .eviction_policy import EvictionPolicy, HeadState, Param, SlotState, StepInput, register_policy
from .fastgen_ref import fastgen_reference

FASTGEN_POLICY = EvictionPolicy(
    name="fastgen",
    reference=fastgen_reference,
    slot_state=(SlotState("score", torch.float32, state="attn_score"), SlotState("token_class", torch.int8)),
    step_inputs=(StepInput("new_class", torch.int8),),
    head_state=(HeadState("policy", torch.long, width=1, state="fastgen_policy"),),
    params=(Param("recovery", "float"), Param("local_n", "int"), Param("local_f", "float"), Param("frequent_n", "int"),
            Param("frequent_f", "float"), Param("criterion", "str"), Param("force", "str")),
    doc="FastGen: profile each KV head at prefill, then follow its policy at every step.",
)
EVICT_FASTGEN = register_policy(FASTGEN_POLICY)
