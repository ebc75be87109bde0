"""SnapKV as an eviction policy (arXiv 2404.14469): reference ``eviction_ref.snapkv_reference``.

Reads q (the observation window votes at prefill); no state besides k/v/positions.
"""

from __future__ import annotations

from .eviction_policy import EvictionPolicy, Param, register_policy
from .eviction_ref import snapkv_reference

SNAPKV_POLICY = EvictionPolicy(
    name="snapkv",
    reference=snapkv_reference,
    params=(Param("budget", "int"), Param("window", "int"), Param("kernel", "int"), Param("pool", "str")),
    doc="SnapKV: compress the prompt to ``budget`` tokens after prefill; decode appends.",
)
EVICT_SNAPKV = register_policy(SNAPKV_POLICY)
