"""StreamingLLM as an eviction policy (arXiv 2309.17453): reference ``eviction_ref.streaming_reference``.

Does not read q (keeps the first ``sinks`` and last ``window`` positions); no extra state.
"""

from __future__ import annotations

from .eviction_policy import EvictionPolicy, Param, register_policy
from .eviction_ref import streaming_reference

STREAMING_POLICY = EvictionPolicy(
    name="streaming",
    reference=streaming_reference,
    needs_q=False,
    params=(Param("sinks", "int"), Param("window", "int")),
    doc="StreamingLLM: keep ``sinks`` first and ``window`` last tokens.",
)
EVICT_STREAMING = register_policy(STREAMING_POLICY)
