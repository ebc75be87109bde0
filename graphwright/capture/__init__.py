"""Capture a Hugging Face causal LM into a step graph with explicit KV state."""

from .capture import capture, model_info
from .step_graph import ModelInfo, StateSpec, StepGraph

__all__ = ["capture", "model_info", "ModelInfo", "StateSpec", "StepGraph"]
