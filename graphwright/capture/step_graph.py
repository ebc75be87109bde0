"""The step graph: a pure function ``(input_ids, positions, logits_index, state...) -> (logits, state...)``.

One graph serves prefill and decode. ``state`` is the explicit KV cache: the key positions
[B, S] followed, per layer, by keys and values. Passes may change what a layer's state holds
(latent K/V, per-head evicted caches); they do so by editing the graph *and* the
``StateSpec`` list, which is what the runtime reads to allocate, thread and account for the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class StateSpec:
    """One state tensor threaded from a step's outputs to the next step's inputs.

    ``shape``: the tensor's shape with ``-1`` for the batch dimension and ``0`` for the
    sequence dimension (``seq_dim``) of an empty cache. ``kind`` is ``"positions"`` for
    bookkeeping, ``"kv"`` for bytes that count as KV cache, or ``"summary"`` for statistics
    derived from the cache (block_sparse's per-page key min / max / mean; ``seq_dim`` counts pages).
    """

    name: str
    kind: str  # "positions" | "kv" | "summary"
    shape: tuple
    dtype: torch.dtype
    seq_dim: int
    layer: int | None = None

    def empty(self, batch: int, device=None) -> torch.Tensor:
        shape = [batch if s == -1 else s for s in self.shape]
        shape[self.seq_dim] = 0
        return torch.zeros(shape, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class ExtraInput:
    """A per-request graph input besides ids, positions and state (e.g. steering weights).

    Passes that need per-request data add a trailing placeholder named ``name`` whose default is
    ``None`` ("not given": the graph then behaves as if the pass were absent), and list it here
    so the runtime knows to feed it. Extra inputs are step-invariant: they are indexed by
    absolute token position, not by cache column, so one tensor serves prefill and every decode
    step and survives KV eviction. ``kind`` says which helper builds it (``"steer"``: see
    ``graphwright.steer.emphasis``); ``meta`` holds what that helper needs (plain data).
    """

    name: str
    kind: str
    doc: str = ""
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the captured model that passes, runtime and reports need."""

    architecture: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    max_positions: int | None = None
    is_moe: bool = False
    attention_modules: tuple = ()  # module path per layer
    moe_modules: tuple = ()  # module path per MoE block
    windows: tuple = ()  # native sliding window per layer as captured (0 = none); () = unknown (no window)

    def dense_kv_bytes_per_token(self) -> int:
        """Bytes one token occupies in a dense cache: 2 (K and V) x layers x KV heads x head dim."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def dense_kv_bytes(self, batch: int, seq_len: int) -> int:
        """Bytes the original model's own cache (HF's ``DynamicCache``) holds for ``batch`` rows of ``seq_len``
        cached tokens: a layer with a native sliding window w keeps only its last w - 1 tokens (the next
        query brings the w-th), every other layer all of them."""
        per_layer = self.dense_kv_bytes_per_token() // max(self.num_layers, 1)
        windows = self.windows or (0,) * self.num_layers
        return batch * per_layer * sum(min(seq_len, w - 1) if w else seq_len for w in windows)


@dataclass
class StepGraph:
    """A captured (and possibly rewritten) step graph with its state layout."""

    gm: torch.fx.GraphModule
    info: ModelInfo
    state: list  # list[StateSpec], in graph input/output order
    notes: dict = field(default_factory=dict)  # per-pass decisions, filled by passes
    extra_inputs: list = field(default_factory=list)  # list[ExtraInput], trailing placeholders after the state

    def init_state(self, batch: int, device=None) -> list:
        return [s.empty(batch, device) for s in self.state]

    def __call__(self, input_ids, positions, logits_index, state, **extras):
        out = self.gm(input_ids, positions, logits_index, *state, **extras)
        return out[0], list(out[1:])

    def copy(self) -> "StepGraph":
        """A deep copy of the graph structure sharing parameter tensors (passes rewrite copies)."""
        import copy

        graph = copy.deepcopy(self.gm.graph)
        for node in graph.nodes:  # fx copies node.meta shallowly: a rewrite of the copy's tags must not reach the original
            if isinstance(node.meta.get("graphwright"), dict):
                node.meta["graphwright"] = dict(node.meta["graphwright"])
        gm = torch.fx.GraphModule(self.gm, graph)
        for node in graph.nodes:  # tensors a rewrite keeps for later passes with no node reading them yet (lowrank_kv's
            # absorbed B_V, read by Expected Attention's eviction op): GraphModule copies only get_attr targets
            for name in ((node.meta.get("graphwright") or {}).get("value_up") or {}).values():
                if not hasattr(gm, name) and isinstance(getattr(self.gm, name, None), torch.Tensor):
                    value = getattr(self.gm, name)
                    if isinstance(value, torch.nn.Parameter):
                        gm.register_parameter(name, value)
                    else:
                        gm.register_buffer(name, value)
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(self.gm, attr):
                setattr(gm, attr, getattr(self.gm, attr))
        if hasattr(self.gm, "_graphwright_codegen"):
            gm._graphwright_codegen = self.gm._graphwright_codegen
        return replace(self, gm=gm, state=list(self.state), notes={k: v for k, v in self.notes.items()},
                       extra_inputs=list(self.extra_inputs))

    def nodes(self, target=None):
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and (target is None or n.target == target)]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask -> absolute positions, -1 on padding (real tokens count from 0)."""
    pos = attention_mask.long().cumsum(dim=1) - 1
    return pos.masked_fill(attention_mask == 0, -1)


def prompt_blocks(T: int, n: int) -> list[tuple[int, int]]:
    """Column ranges of a [B, T] prompt in blocks of n, cut from the end: left padding aligns rows at their
    last token, so every row's last n tokens form the last block; the first block holds the remainder.
    (``evict(block=N)``'s prompt schedule: the runtime and the ONNX export's verification both cut with it.)"""
    first = T % n or n
    return [(0, first)] + [(a, a + n) for a in range(first, T, n)]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def spec_bytes_per_token(spec) -> int:
    """Bytes one token adds to a state tensor: product of the non-batch, non-seq dims x element size."""
    n = 1
    for i, d in enumerate(spec.shape):
        if i != spec.seq_dim and d != -1:
            n *= int(d)
    return n * element_size(spec.dtype)
