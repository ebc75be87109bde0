"""Backends as objects: one registry that ``lower``, ``compile``, the CLI and the docs read.

A ``Backend`` is data plus two optional hooks:

* ``table``: op -> implementation. A dict value is one implementation per
  ``node.meta["graphwright"]["impl"]`` (set by ``fuse_moe(impl=...)``; missing = ``"auto"``);
* ``transforms``: functions ``f(graph)`` that rewrite the lowered copy of the FX graph in place
  *before* the op substitution (the torch backend's in-place cache append is one);
* ``check(model_or_device)``: ``None`` when the backend can run there, else the reason (a
  sentence saying what to do instead); ``require`` raises it as ``ValueError``;
* ``finalize(gm) -> gm``: a last step on the lowered ``GraphModule`` (identity by default);
* ``step_rewrites``: functions ``f(step_graph) -> step_graph`` that may change the state layout,
  applied by ``CompiledModel`` to what it runs (``runtime_graph``) before lowering; the torch
  backends bound native sliding-window caches to their window (``passes/native_windows.py``).
* ``make_step(step_graph, lowered) -> step``: a step function the runtime calls instead of the
  lowered graph (``step(input_ids, positions, logits_index, state, **extras) -> (logits, state)``),
  for backends that own their state layout (the compiled backend's static caches); None = run
  ``lowered`` directly.

Adding a backend is ``register_backend(Backend(...))``: it then becomes a valid
``gw.compile(..., backend=name)``, a ``--backend`` choice of every CLI command and a row of the
README's backend list, with no other edit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..capture.ops import ATTENTION, MOE_EXPERTS, attention_reference, moe_experts_reference
from ..ops.block_sparse import BLOCK_SPARSE_ATTENTION, block_sparse_reference
from ..ops.eviction import LATENT_KEYS
from ..ops.eviction import REFERENCES as EVICTION_REFERENCES
from ..ops.fused_moe import FUSED_MOE, fused_moe_reference
from ..ops.graph_match import cache_concat
from ..ops.latent_attention import LATENT_ATTENTION, latent_attention_reference
from ..ops.page_summary import PAGE_SUMMARY, page_summary_incremental, page_summary_reference
from ..passes.native_windows import bound_native_windows
from .torch.attention import attention_sdpa
from .torch.block_sparse import block_sparse_sdpa
from .torch.cache_append import cache_append
from .torch.compiled import make_static_step
from .torch.decode_linear import finalize_torch
from .torch.eviction_slots import SLOT_OVERRIDES
from .torch.latent_attention import latent_attention_sdpa, latent_keys_fast
from .torch.moe import fused_moe_auto, fused_moe_sorted, fused_moe_triton
from .torch.packed_attention import packed_decode_attention
from .torch.policy_slots import POLICY_SLOT_OVERRIDES
from .torch.scored_attention import scored_attention
from .torch.shared_views import share_views
from .torch.streaming_shift import streaming_rope_shift
from .triton import TRITON_OVERRIDES


@dataclass(frozen=True)
class Backend:
    """One backend: its name, a one-line doc, the op table, graph transforms and hooks."""

    name: str
    doc: str
    table: Mapping[Any, Any]
    transforms: tuple[Callable[[torch.fx.Graph], None], ...] = ()
    check: Callable[[Any], str | None] | None = None
    finalize: Callable[[torch.fx.GraphModule], torch.fx.GraphModule] | None = None
    step_rewrites: tuple[Callable[[Any], Any], ...] = ()

    def runtime_graph(self, step_graph):
        """The step graph this backend runs for ``step_graph`` (``step_rewrites`` applied; itself when none)."""
        for rewrite in self.step_rewrites:
            step_graph = rewrite(step_graph)
        return step_graph
    make_step: Callable[[Any, torch.fx.GraphModule], Callable] | None = None

    def unavailable(self, model_or_device) -> str | None:
        """Why this backend cannot run on ``model_or_device`` (a module, tensor or device), or None."""
        return self.check(model_or_device) if self.check is not None else None

    def require(self, model_or_device) -> None:
        """Raise ``ValueError`` when the backend cannot run on ``model_or_device``."""
        reason = self.unavailable(model_or_device)
        if reason:
            raise ValueError(reason)

    def impl_for(self, node: torch.fx.Node):
        """The implementation for ``node``'s op, or None when the table does not name it."""
        if node.op != "call_function" or node.target not in self.table:
            return None
        impl = self.table[node.target]
        if isinstance(impl, dict):
            impl = impl[node.meta.get("graphwright", {}).get("impl") or "auto"]
        return impl


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) ``backend`` under its name; returns it."""
    if not backend.name or not backend.name.isidentifier():
        raise ValueError(f"a backend name must be an identifier; got {backend.name!r}")
    BACKENDS[backend.name] = backend
    return backend


def get_backend(backend) -> Backend:
    """The ``Backend`` named ``backend`` (a ``Backend`` passes through); ValueError naming the valid ones."""
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[backend]


def device_of(model_or_device) -> torch.device:
    """The device of a module (its first parameter or buffer), a tensor, a device or a device string."""
    if isinstance(model_or_device, (torch.device, str)):
        return torch.device(model_or_device)
    if isinstance(model_or_device, torch.Tensor):
        return model_or_device.device
    for t in (*model_or_device.parameters(), *model_or_device.buffers()):
        return t.device
    return torch.device("cpu")


# -- the built-in backends ----------------------------------------------------------------------
def append_caches_in_place(graph: torch.fx.Graph) -> None:
    """``cat([state input, new], dim)`` -> ``cache_append(state, new, dim)`` (see ``torch/cache_append.py``)."""
    for node in graph.nodes:
        m = cache_concat(node)  # the one cache-concatenation matcher (ops/graph_match.py)
        if m:
            node.target, node.args, node.kwargs = cache_append, (m.cache, m.new, m.dim), {}


def triton_unavailable(model_or_device) -> str | None:
    """Triton kernels need CUDA tensors, or the interpreter (``TRITON_INTERPRET=1``, tests only)."""
    device = device_of(model_or_device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"backend='triton' needs the model on a CUDA device (it is on {device.type}); "
                "on CPU use backend='torch' (or set TRITON_INTERPRET=1 to run the kernels in the "
                "Triton interpreter: correct but slow, for tests)")
    return None


REFERENCE = register_backend(Backend(
    "reference", "the pure-torch oracle (each op's reference implementation; caches grow by the graph's plain cat)",
    {ATTENTION: attention_reference, MOE_EXPERTS: moe_experts_reference,
     LATENT_ATTENTION: latent_attention_reference, FUSED_MOE: fused_moe_reference,
     BLOCK_SPARSE_ATTENTION: block_sparse_reference, PAGE_SUMMARY: page_summary_reference,
     **EVICTION_REFERENCES}))

TORCH = register_backend(Backend(
    "torch", "the default (SDPA attention, sorted/grouped MoE, incremental page summaries, in-place cache append, slot eviction at decode)",
    {ATTENTION: attention_sdpa, MOE_EXPERTS: moe_experts_reference,
     LATENT_ATTENTION: latent_attention_sdpa,
     BLOCK_SPARSE_ATTENTION: block_sparse_sdpa, PAGE_SUMMARY: page_summary_incremental,
     FUSED_MOE: {"auto": fused_moe_auto, "sorted": fused_moe_sorted, "triton": fused_moe_triton},
     # eviction at decode without compaction (torch/eviction_slots.py, torch/policy_slots.py)
     **EVICTION_REFERENCES, **SLOT_OVERRIDES, **POLICY_SLOT_OVERRIDES, LATENT_KEYS: latent_keys_fast},
    # streaming_rope_shift: StreamingLLM keys cached at absolute positions, no per-step key rotation (torch/streaming_shift.py)
    # share_views: one unsqueeze/expand node where every layer repeated the same view (torch/shared_views.py)
    # packed_decode_attention: a decode step over a packed Ada-KV cache reads the packed buffer once (torch/packed_attention.py)
    transforms=(append_caches_in_place, scored_attention, packed_decode_attention, streaming_rope_shift, share_views),
    step_rewrites=(bound_native_windows,),
    finalize=finalize_torch))  # decode GEMV split over the threads ([in, out] copies at 1 thread), flat weight attributes (torch/decode_linear.py)

TRITON = register_backend(Backend(
    "triton", "the torch backend with attention, latent and block-sparse attention and MoE on Triton kernels "
              "(CUDA, or TRITON_INTERPRET=1)",
    # no scored_attention: the Triton attention kernel keeps its layers (H2O/FastGen then score from q, k: decode_probs.step_probs)
    {**TORCH.table, **TRITON_OVERRIDES}, transforms=(append_caches_in_place,), step_rewrites=TORCH.step_rewrites,
    check=triton_unavailable))

COMPILED = register_backend(Backend(
    "compiled", "the torch backend with decode steps run by torch.compile (Inductor) over static-capacity caches, "
                "eager prefill; append-only recipes and fixed-capacity eviction (streaming, h2o with token counts, snapkv), "
                "evict(score=...)/keyformer/scissorhands/fastgen/fraction h2o eagerly after the compiled graph; "
                "packed Ada-KV caches that compress once (snapkv heads='adaptive'/'scores', pyramid=); no block_sparse, "
                "Ada-KV re-split at decode or eviction on lowrank_kv caches",
    # streaming_rope_shift as on torch: StreamingLLM keys cached post-RoPE, no per-step key re-rotation in the compiled step
    TORCH.table, transforms=(append_caches_in_place, scored_attention, packed_decode_attention, streaming_rope_shift),
    make_step=make_static_step,
    finalize=finalize_torch))  # decode GEMVs as graphwright::decode_gemv calls Inductor keeps (torch/decode_linear.py)
