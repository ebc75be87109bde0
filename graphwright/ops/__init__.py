"""Custom ops added by rewrite passes (the capture ops live in ``graphwright.capture.ops``).

Importing this package registers every op here with ``torch.library``.
"""

from .eviction import EVICT_OPS  # noqa: F401
from .fused_moe import FUSED_MOE, fused_moe, fused_moe_reference  # noqa: F401
from .latent_attention import LATENT_ATTENTION, latent_attention, latent_attention_reference  # noqa: F401
