"""Static-capacity caches for the compiled backend: the graph's cache appends become slot writes.

The step graph grows each cache with ``cat([cache, new], dim)`` (the torch backend lowers it to
``cache_append``). Under ``torch.compile`` a growing cache changes a shape at every decode step,
so each step would recompile (or compile a dynamic-shape kernel). Instead, in the gpt-fast style,
each state tensor is a buffer of fixed capacity ``C`` along its sequence dimension, and a decode
step *writes* its new entries at slots ``slot .. slot + T - 1`` in place (``slot_write``) and
attends over all ``C`` slots. Empty slots hold key position -1 (``key_positions`` buffers are
filled with -1, caches with 0), which every attention implementation already masks out, and
softmax ignores slot order, so attending over ``C`` slots equals attending over the filled
prefix (tested: logits against the torch backend).

``slots_from_appends`` rewrites a lowered graph: every ``cache_append(state_input, new, dim)``
becomes ``slot_write(state_input, new, dim, cache_slot[i])`` with ``cache_slot`` a new graph input
(a LongTensor [num_state]: state i's first free slot, shared by all rows; states may differ, e.g.
SnapKV layers next to dense ones; data, not a shape, so a new value never recompiles).
``static_cache_unsupported`` says why a graph cannot run this way: its state must grow only by
appending (identity, ``window``, ``lowrank_kv`` are tested; ``steer``, ``fuse_moe`` append too,
untested), or belong to a static eviction layer (``static_eviction.py``: H2O / StreamingLLM with token-count
budgets; SnapKV appends at decode); ``block_sparse`` page summaries update their state otherwise.
"""

from __future__ import annotations

import torch

from ...ops.adakv_ref import pack_heads_reference, packed_positions_reference
from .cache_append import cache_append


def slot_write(buf: torch.Tensor, new: torch.Tensor, dim: int, slot: torch.Tensor) -> torch.Tensor:
    """``buf[..., slot:slot+T, ...] = new`` along ``dim`` in place (an ``index_put_``); returns ``buf``."""
    dim = dim % buf.dim()
    idx = slot + torch.arange(new.shape[dim], device=buf.device)
    buf[(slice(None),) * dim + (idx,)] = new
    return buf


def slots_per_step(new: torch.fx.Node) -> int:
    """Entries a one-token decode step appends with ``new``: Hk for a packed Ada-KV cache (``pack_heads`` of
    [B, Hk, 1, D] and ``packed_positions(pos, Hk)``: one slot per KV head in the layer's shared buffer), else 1."""
    target = getattr(new, "target", None)
    if target is pack_heads_reference:
        return int(new.args[0].meta["val"].shape[1])
    if target is packed_positions_reference:
        return int(new.args[1])
    return 1


def static_cache_unsupported(graph: torch.fx.Graph, num_state: int, skip=()) -> str | None:
    """Why the lowered ``graph`` (torch backend: appends already ``cache_append``) cannot use static
    caches, or None: each of its ``num_state`` state inputs (but the indices in ``skip``: static
    eviction slots, ``static_eviction.py``) must be used only by one ``cache_append`` whose result
    is the matching state output."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    states = placeholders[3:3 + num_state]
    out = next(n for n in graph.nodes if n.op == "output")
    outputs = list(out.args[0])[1:1 + num_state]
    for i, (ph, res) in enumerate(zip(states, outputs)):
        if i in skip:
            continue
        appends = [u for u in ph.users if u.target is cache_append]
        other = [u for u in ph.users if u.target is not cache_append and not _batch_size_read(u, ph)]
        if len(appends) != 1 or appends[0] is not res or other:
            what = ", ".join(sorted({getattr(u.target, "__name__", str(u.target)) for u in ph.users})) or "nothing"
            return (f"state input {i} ({ph.name}) is not only appended to (it is used by {what}); "
                    "the compiled backend needs caches that grow only by appending")
    return None


def _batch_size_read(node: torch.fx.Node, state: torch.fx.Node) -> bool:
    """``sym_size.int(state, 0)``: the captured graph reads the batch size off a cache (the same in a static buffer)."""
    return node.target is torch.ops.aten.sym_size.int and node.args[0] is state and node.args[1] == 0


def slots_from_appends(graph: torch.fx.Graph, num_state: int, skip=()) -> tuple[torch.fx.Node, dict]:
    """Rewrite ``graph`` in place (see the module docstring); returns the new ``cache_slot`` input,
    placed just before the first state input, and ``{state index: slots_per_step}`` of the rewritten states. State ``i``
    (but those in ``skip``) writes at ``cache_slot[i]``."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(placeholders[3]):
        slot = graph.placeholder("cache_slot")
    grows = {}
    for i, ph in enumerate(placeholders[3:3 + num_state]):
        if i in skip:
            continue
        (user,) = [u for u in ph.users if u.target is cache_append]
        cache, new, dim = user.args
        grows[i] = slots_per_step(new)
        with graph.inserting_before(user):
            slot_i = graph.call_method("narrow", (slot, 0, i, 1))
        user.target, user.args = slot_write, (cache, new, dim, slot_i)
    return slot, grows
