"""``CompiledModel``: the rewritten step graph plus the runtime that drives it."""

from __future__ import annotations

import torch

from .capture.step_graph import StepGraph
from .codegen.backends import Backend, get_backend
from .codegen.lower import lower
from .runtime import Runtime
from .runtime.generate import check_prompt
from .runtime.inputs import position_limit


class CompiledModel:
    """What ``graphwright.compile`` returns.

    ``graph`` is the rewritten ``torch.fx.GraphModule``; ``generate`` runs prefill/decode with
    the runtime-owned KV cache; ``last_stats`` describes the last generation; ``report()``
    tabulates what the recipe did per layer.
    """

    def __init__(self, step_graph: StepGraph, tokenizer=None, recipe=None, backend: str | Backend = "torch", source=None):
        self.step_graph = step_graph
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.backend_object = get_backend(backend)
        self.backend = self.backend_object.name
        rerotate = step_graph.notes.get("rerotate")  # evict(..., rerotate=True): later tokens at n (runtime/rerotate.py)
        if rerotate is not None and self.backend_object.make_step is not None:
            raise ValueError(f"evict(..., rerotate=True) continues positions from the kept count in graphwright's runtime "
                             f"over the step graph's own cache; backend {self.backend!r} owns its cache layout: use "
                             "torch, reference or triton")
        self.source = source  # the original model (kept for eval side by side; never modified)
        self.verification: dict = {}
        # what runs: the step graph after the backend's own rewrites (torch: native sliding windows hold their window)
        self.runtime_graph = self.backend_object.runtime_graph(step_graph)
        self._lowered = lower(self.runtime_graph.gm, self.backend_object)
        make_step = self.backend_object.make_step  # backends that own their state layout (compiled: static caches)
        self._backend_step = make_step(self.runtime_graph, self._lowered) if make_step is not None else None
        self._runtime = Runtime(self._step, self.runtime_graph.state, step_graph.info,
                                max_positions=position_limit(step_graph.info, step_graph.notes.get("recipe"), step_graph.notes),
                                recipe=str(recipe) if recipe is not None else None,
                                prefill_chunk=step_graph.notes.get("prefill_chunk"))
        if "kvzip" in step_graph.notes:  # evict(score='kvzip'): the replay runs after every prompt step
            if self._backend_step is not None:
                raise ValueError(f"evict(score='kvzip') runs its replay in graphwright's runtime over the step graph's "
                                 f"own cache; backend {self.backend!r} owns its cache layout: use torch or reference")
            from .runtime.kvzip_replay import KVzipReplay

            self._runtime.after_prompt = KVzipReplay(self.runtime_graph, self.backend_object, step_graph.notes["kvzip"])
        if rerotate is not None:
            self._runtime.rerotated_layers = tuple(rerotate["layers"])

    def _step(self, input_ids, positions, logits_index, state, **extras):
        if self._backend_step is not None:
            return self._backend_step(input_ids, positions, logits_index, state, **extras)
        out = self._lowered(input_ids, positions, logits_index, *state, **extras)
        return out[0], list(out[1:])

    @property
    def graph(self) -> torch.fx.GraphModule:
        return self.step_graph.gm

    def lowered_code(self) -> str:
        """Python source of the lowered step (``forward`` of the graph the runtime runs on this backend).

        Every graphwright op appears as the backend implementation it calls (e.g. ``attention_sdpa``,
        ``cache_append`` on torch), so a reader can follow the decode hot path line by line.
        """
        return self._lowered.code

    @property
    def info(self):
        return self.step_graph.info

    @property
    def last_stats(self) -> dict:
        return self._runtime.last_stats

    def prefill(self, input_ids, attention_mask=None, allow_long: bool = False):
        """Prefill (and compress, question-agnostic) a context once; returns a ``Context`` that
        ``generate(question_ids, context=ctx)`` reuses for any number of questions, and that
        ``ctx.save(path)`` / ``graphwright.Context.load(path)`` keep on disk (``runtime/context.py``)."""
        self._context_supported()
        return self._runtime.prefill(input_ids, attention_mask, allow_long=allow_long, recipe=self._runtime.recipe)

    def _context_supported(self) -> None:
        if "gemfilter" in self.step_graph.notes:
            raise ValueError("gemfilter selects prompt tokens with the question in view; a reusable context cannot be "
                             "made with it (compress the context with snapkv/h2o/streaming instead)")
        if self.step_graph.notes.get("evict", {}).get("settings", {}).get("scorer") == "finch":
            from .ops.scorers.finch import CONTEXT_REFUSAL

            raise ValueError(CONTEXT_REFUSAL)
        if self._backend_step is not None:
            raise ValueError(f"backend {self.backend!r} owns its cache layout; reusable contexts run on the torch, "
                             "reference and triton backends")

    def generate(self, input_ids, max_new_tokens: int = 32, emphasis=None, **kwargs) -> torch.Tensor:
        """Token ids like HF ``generate``. ``emphasis`` (steered models): ``[(start, end), ...]`` token
        spans of the unpadded prompt, end exclusive, or one such list per row of a batch. ``context``:
        a ``Context`` from ``prefill``; ``input_ids`` then continue it (the returned ids start with them)."""
        if kwargs.get("context") is not None:
            self._context_supported()
        if "gemfilter" in self.step_graph.notes:  # prompt selection pass first (graphwright/runtime/gemfilter.py)
            if emphasis is not None:
                raise ValueError("emphasis spans index the full prompt; they cannot be combined with gemfilter")
            from .runtime.gemfilter import gemfilter_generate

            return gemfilter_generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
        extras = self._extras(emphasis, input_ids, kwargs.get("attention_mask"))
        out = self._runtime.generate(input_ids, max_new_tokens=max_new_tokens, extras=extras, **kwargs)
        if hasattr(self._backend_step, "stats"):  # e.g. the compiled backend's cache capacity and compiles
            self._runtime.last_stats.update(self._backend_step.stats())
        return out

    def logits(self, input_ids, attention_mask=None, emphasis=None, allow_long: bool = False) -> torch.Tensor:
        return self._runtime.logits(input_ids, attention_mask, extras=self._extras(emphasis, input_ids, attention_mask),
                                    allow_long=allow_long)

    def generate_text(self, prompt, emphasis=None, max_new_tokens: int = 64, chat: bool = True, **kwargs):
        """Generate from text; ``emphasis``: substrings or ``(char_start, char_end)`` spans of the prompt.

        A list of prompts is a left-padded batch (then ``emphasis`` is one list per prompt).
        Returns the new text (a list for a list of prompts).
        """
        from .steer.spans import encode_with_emphasis

        if self.tokenizer is None:
            raise ValueError("generate_text needs a tokenizer: compile with tokenizer=...")
        ids, mask, spans = encode_with_emphasis(self.tokenizer, prompt, emphasis, chat=chat)
        out = self.generate(ids, max_new_tokens=max_new_tokens, attention_mask=mask, emphasis=spans, **kwargs)
        texts = [self.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
        return texts if isinstance(prompt, (list, tuple)) else texts[0]

    def _extras(self, emphasis, input_ids, attention_mask) -> dict:
        if emphasis is None:
            return {}
        from .steer.emphasis import steer_extras

        input_ids, attention_mask = check_prompt(input_ids, attention_mask, self.info.vocab_size)  # before spans read the mask
        return steer_extras(self.step_graph, emphasis, input_ids, attention_mask)

    def report(self):
        from .inspect.report import build_report

        return build_report(self)

    def __repr__(self) -> str:
        r = str(self.recipe) if self.recipe is not None else "identity"
        return f"CompiledModel({self.info.architecture}, recipe={r!r}, backend={self.backend!r}, layers={self.info.num_layers})"
