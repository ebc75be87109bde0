"""Prefill/decode runtime over a step function with explicit KV state."""

from .generate import Runtime, positions_from_mask

__all__ = ["Runtime", "positions_from_mask"]
