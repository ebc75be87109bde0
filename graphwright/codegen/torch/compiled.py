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
graph, so the compiled step no longer takes every weight as an input; decode-sized linears reach it
as ``graphwright::decode_gemv`` calls, the torch backend's ``finalize``, which it keeps as they are:
one GEMV split over the threads, ``decode_linear.py``; larger ones become ``mkl._mkl_linear`` on
prepacked weights), ``max_autotune`` off, and (``DECODE_CONFIG``) ``cpp.min_chunk_size``
4,096 and ``size_asserts`` off. Where a decode step's time goes (SmolLM2-135M, prompt 256, session 14,
``bench/profile_decode_step.py --profile --kernel-profile`` and ``bench/profile_compiled_linears.py``, on a
machine loaded 6x over its 2 cores): the 211 GEMVs stream 538 MB of weights; ``mkl._mkl_linear`` on
packed weights runs them at the rate of ``x @ Wt`` on [in, out] copies (36.5 vs 36.0 ms CPU per step's
linears at 2 threads; ``F.linear`` on HF's [out, in] layout 45.8 ms), so the weight layout is not what
separates this path from ONNX Runtime. The thread count is (session 15, idle): every one of those GEMVs runs on
one thread; split over both (``decode_gemv``) a pass over the weights takes 23 ms instead of 34-42 ms and the
compiled identity step 30 ms instead of 42 ms (``bench/profile_decode_step.py``; see ``decode_linear.py``'s
caveat: in a fresh process ``F.linear`` used both cores). The other cost: each OpenMP parallel region of a step is a barrier
both threads must reach. Inductor parallelised the 30 SiLU * up kernels (1,536 elements, 768 per thread:
above the default ``min_chunk_size`` 512), which with ATen's 30 SDPA calls made 60 barriers per step; on
the loaded machine each cost ~18 ms (a descheduled thread), 95% of the step's profile. At 4,096 the
elementwise kernels of a batch-1 step run serially (a barrier costs more than their microsecond of
work; at batch >= 6 the SiLU kernel, at capacity 8,192 the mask, is parallel again). ``size_asserts`` off drops ~300 Python
``assert_size_stride`` calls per step from the output code's wrapper. Graphwright ops inside the step: the torch backend's
implementations are plain torch functions, so Dynamo traces through them with no graph break
(``TORCH_LOGS=graph_breaks``): ``attention_sdpa`` and ``latent_attention_sdpa`` reach
``scaled_dot_product_attention``, which Inductor calls as its fallback ATen kernel
(``_scaled_dot_product_flash_attention_for_cpu``); mask building, RoPE and ``slot_write`` (an
``index_put_``) are fused into generated kernels that write the input buffers in place.

Eviction with a fixed decode capacity (``static_eviction.py``): StreamingLLM and H2O with
token-count budgets ``c`` keep per-head slot buffers of at most ``c + 1`` slots (capacity
``min(capacity_for(n + 1), c + 1)``, so once the budget is reached the shapes, and the compiled
step, never change; the new token takes each head's first empty slot and eviction marks the
victim's slot empty, all in the compiled graph); SnapKV evicts at prefill (eager) and appends at
decode (the buckets above). StreamingLLM keys are cached post-RoPE (the torch backend's
``streaming_rope_shift``): no key is re-rotated per step. Refused with a ``ValueError`` naming the
recipe and the reason when the ``CompiledModel`` is built: eviction on ``lowrank_kv`` caches, packed
Ada-KV caches re-split at every decode step (``evict(rule="adaptive"|"scores")``, ``h2o(heads="adaptive")``),
``block_sparse`` (its page summaries are not appended). The packed caches that compress once
(``snapkv(heads="adaptive"|"scores")``, ``pyramid=``) append Hk slots per decode step to one shared buffer per
layer (``static_cache.slots_per_step``) and attend with ``packed_attention.packed_decode``. Their lengths
differ per layer (the heads' shares), so per-layer buckets would be crossed at different steps, each crossing a
recompile (SmolLM2-135M, ``mass25`` at 600 tokens: two compiles of 60-100 s in 12 steps); instead a packed buffer is
(re)allocated with room for ``PACKED_ROOM_STEPS`` steps (Hk slots each, then rounded up to a bucket) and, when one runs
out, every state is re-checked at once: the others were given the same room at the same step, so recompiles come at
most once per ``PACKED_ROOM_STEPS`` steps, like the dense buckets. The room is counted in ``kv_bytes`` (what is held). The generic scored op
(``evict(score=...)``), Keyformer, Scissorhands, FastGen and H2O with fraction budgets (no fixed capacity)
run eagerly after the compiled decode graph (``static_fallback.py``: cut out like the ONNX split's
runtime ops, applied with their references on the static buffers narrowed to the torch backend's
widths, written back).
"""

from __future__ import annotations

import copy
import time

import torch

from .static_cache import slots_from_appends, static_cache_unsupported
from .static_eviction import EvictionNotStatic, eviction_decode_rewrite
from .static_fallback import FallbackNotPossible, eager_fallback_rewrite, run_fallback

RECOMPILE_LIMIT = 64
PACKED_ROOM_STEPS = 256  # decode steps of room a packed Ada-KV buffer gets when (re)allocated: see the module docstring
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


# Inductor settings of the CPU decode step (module docstring: why each). ``freezing``: weights become
# constants (decode GEMVs stay ``graphwright::decode_gemv`` calls; larger linears ``mkl._mkl_linear``).
# ``cpp.min_chunk_size``: a generated kernel runs on the OpenMP threads only when each thread gets >= this
# many elements; at 4,096, every elementwise kernel of a batch-1 decode step (<= 1,536 elements, the SiLU
# * up product the largest) runs serially: no parallel region,
# no barrier. ``size_asserts``: no shape/stride check of every extern kernel's output in the Python wrapper.
DECODE_CONFIG = {"freezing": True, "cpp.min_chunk_size": 4096, "size_asserts": False}
PREVIOUS_CONFIG = {"freezing": True}  # session-13 settings, for benchmarks: ``partial(compile_decode, config=...)``


def compile_decode(gm: torch.fx.GraphModule, freezing: bool = True, config: dict | None = None):
    """``torch.compile`` of the decode graph: static shapes; CUDA graphs on CUDA, Inductor C++ on CPU with
    ``DECODE_CONFIG`` (``config`` replaces it; ``freezing=False`` turns freezing off). A benchmark can compare
    ``cm._backend_step.compiler = partial(compile_decode, config=PREVIOUS_CONFIG)``."""
    _raise_recompile_limit()
    device = next((t.device for t in (*gm.parameters(), *gm.buffers())), torch.device("cpu"))
    if device.type == "cuda":
        return torch.compile(gm, dynamic=False, mode="reduce-overhead")
    patch = {**(DECODE_CONFIG if config is None else config), **({} if freezing else {"freezing": False})}
    fn = torch.compile(gm, dynamic=False, options={"max_autotune": False})

    def patched(*args, **kwargs):
        # Inductor reads its config when the (lazy) compile runs, so it is patched around each call;
        # as ``torch.compile(options=...)``, ``freezing`` was not applied (weights stayed graph inputs)
        with torch._inductor.config.patch(patch):
            return fn(*args, **kwargs)

    return patched


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)


SUPPORTED = ("It supports recipes whose KV state grows only by appending (identity, window, lowrank_kv; steer, noop, fuse_moe "
             "append too, untested) and eviction with a fixed decode capacity: streaming(sinks, window), h2o(heavy=N, recent=M) "
             "with token counts, snapkv(budget=N) including its packed Ada-KV forms (heads='adaptive' or 'scores', pyramid=) "
             "(evict(score=...), keyformer, scissorhands, fastgen and h2o with fraction budgets run eagerly after the compiled "
             "step); eviction on lowrank_kv caches, Ada-KV re-split at decode (evict(rule='adaptive' or 'scores'), "
             "h2o(heads='adaptive')) and block_sparse need backend='torch'")


class StaticCacheStep:
    """``step(input_ids, positions, logits_index, state, **extras) -> (logits, state)`` for the runtime.

    The state this step returns at decode is its own static buffers (full capacity: the runtime's
    ``kv_bytes`` therefore counts the capacity ``C``, what the buffers really hold). A state
    passed in that is not the last one returned (a fresh prefill state, or an older sequence's)
    is copied into new buffers; as in the torch backend, a state passed to a step is donated.

    Capacities are per state: an append-only state ``i`` holds ``filled[i]`` slots and the next
    token goes to slot ``filled[i]`` (``cache_slot[i]``); a state of a static eviction layer
    (``static_eviction.py``, ``evicting[i]["limit"] = c + 1``) holds at most ``filled[i] <= c``
    tokens anywhere in its buffer (the new one goes to each head's first empty slot), so its
    capacity is ``min(capacity_for(filled + 1), c + 1)``: once the budget is reached its shape
    never changes.
    """

    def __init__(self, specs, lowered: torch.fx.GraphModule, source_graph: torch.fx.Graph, backend_name: str = "compiled"):
        self.specs = list(specs)
        self.eager = lowered
        graph = copy.deepcopy(lowered.graph)
        try:
            self.evicting = eviction_decode_rewrite(graph, source_graph, self.specs)
            self.fallback = eager_fallback_rewrite(graph, source_graph, len(self.specs))  # static_fallback.py
        except (EvictionNotStatic, FallbackNotPossible) as e:
            raise ValueError(f"backend={backend_name!r} cannot run this recipe: {e}. {SUPPORTED}") from None
        kinds = self.fallback["kinds"]
        self.heads = {i for i, k in kinds.items() if k == "head"}  # per-head state of an eager op: no capacity
        skip = {*self.evicting, *(i for i, k in kinds.items() if k != "append")}
        reason = static_cache_unsupported(graph, len(self.specs), skip=skip)
        if reason:
            raise ValueError(f"backend={backend_name!r} cannot run this graph: {reason}. {SUPPORTED}")
        _, grows = slots_from_appends(graph, len(self.specs), skip=skip)
        self.grow = [grows.get(i, 1) for i in range(len(self.specs))]  # slots one decode step appends (Hk: packed caches)
        self._names = [n.name for n in graph.nodes if n.op == "placeholder"]
        self._decode_graph = graph
        self.compiler = compile_decode  # GraphModule -> callable; tests swap in ``lambda gm: gm`` (static caches, eager)
        self._compiled = None
        self._bufs: list | None = None
        self._filled: list[int] = []
        self.compiles: list[dict] = []  # one entry per (batch, capacities) first seen: seconds of its first call
        self._seen: set = set()

    # -- state ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The largest state capacity (slots)."""
        return 0 if self._bufs is None else max(self._caps())

    def _caps(self) -> tuple:
        return tuple(b.shape[s.seq_dim] for b, s in zip(self._bufs, self.specs))

    def _cap_for(self, i: int, need: int) -> int:
        if i in self.heads:
            return self._filled[i]
        if self.grow[i] > 1:  # a packed cache: room for PACKED_ROOM_STEPS more steps (module docstring)
            return capacity_for(need + self.grow[i] * PACKED_ROOM_STEPS)
        limit = self.evicting[i]["limit"] if i in self.evicting else None
        return capacity_for(need) if limit is None else min(capacity_for(need), limit)

    def _full(self, i: int, n: int, c: int) -> bool:
        """State ``i`` (``n`` filled of ``c``) cannot take the next step's slots in its bucket."""
        return n + self.grow[i] > c if self.grow[i] > 1 else self._cap_for(i, n + 1) > c

    def _owns(self, state) -> bool:
        return self._bufs is not None and len(state) == len(self._bufs) and all(a is b for a, b in zip(state, self._bufs))

    def _prefix(self, state):
        """The dense state the eager graph expects: the filled slots of append-only buffers, every slot of
        an evicting one (empty slots have position -1)."""
        return [b if i in self.evicting else b.narrow(s.seq_dim, 0, n)
                for i, (b, s, n) in enumerate(zip(state, self.specs, self._filled))]

    def _adopt(self, state) -> None:
        """Copy ``state`` into buffers of capacity ``_cap_for(i, filled[i] + 1)`` (a buffer that already has it is kept)."""
        bufs = []
        for i, (t, s) in enumerate(zip(state, self.specs)):
            cap = self._cap_for(i, self._filled[i] + self.grow[i])
            if t.shape[s.seq_dim] == cap and self._owns(state):
                bufs.append(t)
                continue
            if t.shape[s.seq_dim] > cap:
                raise RuntimeError(f"state {s.name} holds {t.shape[s.seq_dim]} slots, more than its decode capacity {cap}")
            shape = list(t.shape)
            shape[s.seq_dim] = cap
            fill = self._fill(i)
            buf = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            buf.narrow(s.seq_dim, 0, t.shape[s.seq_dim]).copy_(t)
            if buf.device.type == "cuda":  # CUDA graphs replay in-place writes only into static addresses
                torch._dynamo.mark_static_address(buf)
            bufs.append(buf)
        self._bufs = bufs

    def _fill(self, i: int):
        """An empty slot's value: -1 key positions, zeros (an eager op's per-slot score starts at 0, as the op extends it)."""
        if i in self.evicting:
            return self.evicting[i]["fill"]
        return -1 if self.specs[i].kind == "positions" and self.fallback["kinds"].get(i) != "slot" else 0

    def _apply_fallback(self, out, input_ids, positions, logits_index, slot, extras, filled) -> None:
        """Run the eager ops (``static_fallback.py``) on the compiled step's cut outputs; write their results back."""
        n = len(self.specs)
        inputs = dict(zip(self._names, (input_ids, positions, logits_index, slot, *self._bufs)))
        inputs.update(extras)

        def width(t, own):  # the torch backend's width of state j before / after this step's append
            when, j = own
            return t.narrow(self.specs[j].seq_dim, 0, filled[j] + (when == "after"))

        new = run_fallback(self.fallback, list(out[1 + n:]), inputs, width)
        for j, t in new.items():
            if j in self.heads:
                self._bufs[j] = t.contiguous()
                continue
            buf, dim = self._bufs[j], self.specs[j].seq_dim
            w = t.shape[dim]  # filled + 1 (kept everything), or the compacted width
            if t.data_ptr() != buf.data_ptr():
                buf.narrow(dim, 0, w).copy_(t)
            buf.narrow(dim, w, buf.shape[dim] - w).fill_(self._fill(j))
            self._filled[j] = w

    # -- steps ---------------------------------------------------------------------------------
    def _decode_fn(self):
        if self._compiled is None:
            gm = torch.fx.GraphModule(self.eager, self._decode_graph)
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
            self._filled = [t.shape[s.seq_dim] for t, s in zip(state, self.specs)]
            self._adopt(state)
        elif any(self._full(i, n, c) for i, (n, c) in enumerate(zip(self._filled, self._caps()))):
            self._adopt(self._bufs)  # a bucket crossed: copy into bigger buffers (whole buffers: evicting slots lie anywhere)
        slot = torch.tensor(self._filled, dtype=torch.long, device=input_ids.device)
        key = (input_ids.shape[0], self._caps())
        t0 = time.perf_counter()
        out = self._decode_fn()(input_ids, positions, logits_index, slot, *self._bufs, **extras)
        if key not in self._seen:
            self._seen.add(key)
            self.compiles.append({"batch": key[0], "capacity": max(key[1]), "first_call_s": time.perf_counter() - t0})
        filled = list(self._filled)
        self._filled = [min(n + 1, self.evicting[i]["limit"] - 1) if i in self.evicting else n if i in self.heads
                        else n + self.grow[i] for i, n in enumerate(self._filled)]
        if self.fallback["records"]:
            self._apply_fallback(out, input_ids, positions, logits_index, slot, extras, filled)
        return out[0], list(self._bufs)

    def stats(self) -> dict:
        """Facts for ``last_stats``: the largest static capacity, the most slots filled, and the compiles so far
        (seconds of each first call; ``capacity``: the largest state capacity of that compile)."""
        return {"cache_capacity": self.capacity, "cache_filled": max(self._filled, default=0), "compiles": list(self.compiles)}


def make_static_step(step_graph, lowered: torch.fx.GraphModule) -> StaticCacheStep:
    """The compiled backend's ``make_step`` hook."""
    return StaticCacheStep(step_graph.state, lowered, step_graph.gm.graph)
