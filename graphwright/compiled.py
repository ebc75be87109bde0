"""``CompiledModel``: the rewritten step graph plus the runtime that drives it."""

from __future__ import annotations

import torch

from .capture.step_graph import StepGraph
from .codegen.lower import lower
from .runtime import Runtime


class CompiledModel:
    """What ``graphwright.compile`` returns.

    ``graph`` is the rewritten ``torch.fx.GraphModule``; ``generate`` runs prefill/decode with
    the runtime-owned KV cache; ``last_stats`` describes the last generation; ``report()``
    tabulates what the recipe did per layer.
    """

    def __init__(self, step_graph: StepGraph, tokenizer=None, recipe=None, backend: str = "torch", source=None):
        self.step_graph = step_graph
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.backend = backend
        self.source = source  # the original model (kept for eval side by side; never modified)
        self.verification: dict = {}
        self._lowered = lower(step_graph.gm, backend)
        self._runtime = Runtime(self._step, step_graph.state, step_graph.info)

    def _step(self, input_ids, positions, logits_index, state):
        out = self._lowered(input_ids, positions, logits_index, *state)
        return out[0], list(out[1:])

    @property
    def graph(self) -> torch.fx.GraphModule:
        return self.step_graph.gm

    @property
    def info(self):
        return self.step_graph.info

    @property
    def last_stats(self) -> dict:
        return self._runtime.last_stats

    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        return self._runtime.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self._runtime.logits(input_ids, attention_mask)

    def report(self):
        from .inspect.report import build_report

        return build_report(self)

    def __repr__(self) -> str:
        r = str(self.recipe) if self.recipe is not None else "identity"
        return f"CompiledModel({self.info.architecture}, recipe={r!r}, backend={self.backend!r}, layers={self.info.num_layers})"
