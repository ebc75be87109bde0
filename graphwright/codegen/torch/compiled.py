"""The compiled backend's step: eager prefill, ``torch.compile``d decode over static-capacity caches.

Technique (gpt-fast style): prefill runs the torch backend's lowered graph eagerly (one call per
prompt; its shapes vary with the prompt, so compiling it would mostly buy recompiles). Its
state is then copied into static buffers of capacity ``C`` (``static_cache.py``: key positions
filled with -1, caches with 0), and every decode step runs a copy of the lowered graph whose
cache appends are in-place slot writes, compiled once with ``torch.compile`` (Inductor: C++/OpenMP
kernels on CPU; ``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA, with the buffers marked as
static addresses; untested: no GPU here; there a step's logits are overwritten by the next replay,
which the runtime never reads). A decode
step's shapes depend only on the batch size and ``C``, never on the sequence length; the next
free slot is a tensor input, so a new slot index is data, not a recompile.

Capacity buckets, static shapes (``dynamic=False``) rather than ``dynamic=True``: a static
``C`` lets Inductor specialise every kernel, and a decode step's attention reads all ``C`` slots,
so its cost grows with ``C``, not with the filled length. ``capacity_for(n)`` rounds ``n`` up to a
multiple of 256 up to 2,048 slots, above that to a multiple of 1/8 of the next power of two
(at most ~12.5% unused slots, 8 buckets per doubling of the context), so a 4k prompt attends over
<= 4,096 slots, not 8k. Crossing a bucket copies the cache into a bigger buffer and compiles the
step for the new ``C`` once (Dynamo caches one graph per (batch, ``C``); the recompile limit is
raised to ``RECOMPILE_LIMIT``). With ``dynamic=True`` one compile would serve all lengths, at the
price of symbolic-shape kernels; buckets keep compiles rare enough (one per bucket crossed).

Compilation is lazy (the first decode step) and cached on the step object, i.e. on the
``CompiledModel``. Inductor knobs on CPU: ``freezing`` (weights become constants of the compiled
graph, so the compiled step no longer takes every weight as an input, and linears become
``mkl._mkl_linear`` on prepacked weights, ``cpp.weight_prepack``: a prepacked copy of the
linear weights besides the model's), ``max_autotune`` off. Graphwright ops inside the step: the torch backend's
implementations are plain torch functions, so Dynamo traces through them with no graph break
(``TORCH_LOGS=graph_breaks``): ``attention_sdpa`` and ``latent_attention_sdpa`` reach
``scaled_dot_product_attention``, which Inductor calls as its fallback ATen kernel
(``_scaled_dot_product_flash_attention_for_cpu``); mask building, RoPE and ``slot_write`` (an
``index_put_``) are fused into generated kernels that write the input buffers in place. Graphs
whose state is not append-only (eviction recipes, ``block_sparse``)
are refused with a ``ValueError`` when the ``CompiledModel`` is built.
"""

from __future__ import annotations

import copy
import time

import torch

from .static_cache import slots_from_appends, static_cache_unsupported

RECOMPILE_LIMIT = 64
SMALL_GRANULE, SMALL_LIMIT = 256, 2048


def capacity_for(n: int) -> int:
    """Static cache capacity for ``n`` filled slots (see the module docstring: the bucket policy)."""
    if n < 1:
        raise ValueError(f"a cache capacity is for >= 1 slots; got {n}")
    if n <= SMALL_LIMIT:
        granule = SMALL_GRANULE
    else:
        granule = (1 << (n - 1).bit_length()) // 8
    return -(-n // granule) * granule


def compile_decode(gm: torch.fx.GraphModule, freezing: bool = True):
    """``torch.compile`` of the decode graph: static shapes; CUDA graphs on CUDA, Inductor C++ on CPU with
    ``freezing`` (a benchmark can compare ``cm._backend_step.compiler = partial(compile_decode, freezing=False)``)."""
    _raise_recompile_limit()
    device = next((t.device for t in (*gm.parameters(), *gm.buffers())), torch.device("cpu"))
    if device.type == "cuda":
        return torch.compile(gm, dynamic=False, mode="reduce-overhead")
    fn = torch.compile(gm, dynamic=False, options={"max_autotune": False})
    if not freezing:
        return fn

    def frozen(*args, **kwargs):
        # Inductor reads ``freezing`` when the (lazy) compile runs, so it is patched around each call;
        # as ``torch.compile(options=...)`` it was not applied (weights stayed graph inputs in the output code)
        with torch._inductor.config.patch(freezing=True):
            return fn(*args, **kwargs)

    return frozen


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)


class StaticCacheStep:
    """``step(input_ids, positions, logits_index, state, **extras) -> (logits, state)`` for the runtime.

    The state this step returns at decode is its own static buffers (full capacity: the runtime's
    ``kv_bytes`` therefore counts the capacity ``C``, what the buffers really hold). A state
    passed in that is not the last one returned (a fresh prefill state, or an older sequence's)
    is copied into new buffers; as in the torch backend, a state passed to a step is donated.
    """

    def __init__(self, specs, lowered: torch.fx.GraphModule, backend_name: str = "compiled"):
        reason = static_cache_unsupported(lowered.graph, len(specs))
        if reason:
            raise ValueError(f"backend={backend_name!r} cannot run this graph: {reason}. It supports recipes whose "
                             "KV state grows only by appending (identity, window, lowrank_kv; steer, noop, fuse_moe append too, untested); "
                             "eviction recipes (h2o, snapkv, streaming, fastgen) and block_sparse need backend='torch'")
        self.specs = list(specs)
        self.eager = lowered
        self.compiler = compile_decode  # GraphModule -> callable; tests swap in ``lambda gm: gm`` (static caches, eager)
        self._compiled = None
        self._bufs: list | None = None
        self._filled = 0
        self.compiles: list[dict] = []  # one entry per (batch, capacity) first seen: seconds of its first call
        self._seen: set = set()

    # -- state ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self._bufs is None else self._bufs[0].shape[self.specs[0].seq_dim]

    def _owns(self, state) -> bool:
        return self._bufs is not None and len(state) == len(self._bufs) and all(a is b for a, b in zip(state, self._bufs))

    def _prefix(self, state):
        """The filled slots of our buffers (the dense state the eager graph expects)."""
        return [b.narrow(s.seq_dim, 0, self._filled) for b, s in zip(state, self.specs)]

    def _adopt(self, state, need: int) -> None:
        """Copy ``state`` (S filled slots) into fresh buffers of capacity ``capacity_for(need)``."""
        cap = capacity_for(need)
        bufs = []
        for t, s in zip(state, self.specs):
            shape = list(t.shape)
            shape[s.seq_dim] = cap
            buf = torch.full(shape, -1, dtype=t.dtype, device=t.device) if s.kind == "positions" else t.new_zeros(shape)
            buf.narrow(s.seq_dim, 0, t.shape[s.seq_dim]).copy_(t)
            if buf.device.type == "cuda":  # CUDA graphs replay in-place writes only into static addresses
                torch._dynamo.mark_static_address(buf)
            bufs.append(buf)
        self._bufs = bufs

    # -- steps ---------------------------------------------------------------------------------
    def _decode_fn(self):
        if self._compiled is None:
            graph = copy.deepcopy(self.eager.graph)
            slots_from_appends(graph, len(self.specs))
            gm = torch.fx.GraphModule(self.eager, graph)
            gm.recompile()
            self._compiled = self.compiler(gm)
        return self._compiled

    def __call__(self, input_ids, positions, logits_index, state, **extras):
        T = input_ids.shape[1]
        owned = self._owns(state)
        if T != 1:  # prefill (or any multi-token step): the torch backend's graph, eagerly
            out = self.eager(input_ids, positions, logits_index, *(self._prefix(state) if owned else state), **extras)
            return out[0], list(out[1:])
        if not owned:
            self._filled = state[0].shape[self.specs[0].seq_dim]
            self._adopt(state, self._filled + 1)
        elif self._filled + 1 > self.capacity:
            self._adopt(self._prefix(self._bufs), self._filled + 1)
        slot = torch.tensor([self._filled], dtype=torch.long, device=input_ids.device)
        key = (input_ids.shape[0], self.capacity)
        t0 = time.perf_counter()
        out = self._decode_fn()(input_ids, positions, logits_index, slot, *self._bufs, **extras)
        if key not in self._seen:
            self._seen.add(key)
            self.compiles.append({"batch": key[0], "capacity": key[1], "first_call_s": time.perf_counter() - t0})
        self._filled += 1
        return out[0], list(self._bufs)

    def stats(self) -> dict:
        """Facts for ``last_stats``: the static capacity and the compiles so far (seconds of each first call)."""
        return {"cache_capacity": self.capacity, "cache_filled": self._filled, "compiles": list(self.compiles)}


def make_static_step(step_graph, lowered: torch.fx.GraphModule) -> StaticCacheStep:
    """The compiled backend's ``make_step`` hook."""
    return StaticCacheStep(step_graph.state, lowered)
