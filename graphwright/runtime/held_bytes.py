"""What a cache really occupies, beside what its live tokens need.

``kv_bytes`` counts the elements of each KV state tensor (live tokens: what the recipe keeps). The
process may hold more: the torch runtime's in-place append (``codegen/torch/cache_append.py``)
grows buffers geometrically, slot caches keep capacity for the next token, and an eviction op
may return views over a longer buffer. So the runtime also reports

* ``kv_storage_bytes``: the bytes of the storages behind the KV state tensors, each storage counted
  once (``Tensor.untyped_storage().nbytes()``), slack included;
* ``kv_state_bytes``: the same for every other state tensor (key positions, H2O/FastGen scores,
  block-sparse page summaries);
* ``prefill_peak_bytes``: inside a prefill step each layer builds its prompt's full K/V before its
  eviction op (if any) cuts it, while the layers before it already hold their cut caches. The
  peak is ``max_l (sum_{j<l} held_j + max(held_l, full_l))`` with ``held`` the storage each layer
  holds after the step and ``full_l`` = batch x prompt length x the layer's per-token KV bytes.
  This is computed from the layer order, not sampled (a CPU allocator has no peak counter);
  it is exact for the K/V the graph keeps and leaves out the step's other temporaries.

Invariant tested (``tests/runtime/test_held_bytes.py``): ``kv_storage_bytes`` equals the sum of the
distinct storages of every KV tensor the runtime hands to the next step, and it is at least
``kv_bytes``; an evicting recipe's prefill peak is above what it holds after prefill.
"""

from __future__ import annotations

import math


def live_bytes(state, specs, kind: str = "kv") -> int:
    """Elements x element size of the state tensors of ``kind`` (live tokens, no slack)."""
    return sum(t.numel() * t.element_size() for t, s in zip(state, specs) if s.kind == kind)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by views counts once).

    One ``untyped_storage()`` per tensor (it builds a Python object; the runtimes call this after every
    decode step over every state tensor)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        n = st.nbytes()
        if n or t.numel():
            seen[(st.data_ptr(), n, t.device.type)] = n
    return sum(seen.values())


def held_bytes(state, specs) -> dict:
    """``{"kv_storage_bytes", "kv_state_bytes"}`` of a state list."""
    kv = [t for t, s in zip(state, specs) if s.kind == "kv"]
    rest = [t for t, s in zip(state, specs) if s.kind != "kv"]
    return {"kv_storage_bytes": storage_bytes(kv), "kv_state_bytes": storage_bytes(rest)}


def per_token_bytes(spec) -> int:
    """KV bytes one token adds to ``spec``'s tensor per batch row."""
    dims = [d for i, d in enumerate(spec.shape) if i != spec.seq_dim and d != -1]
    return math.prod(dims) * spec.dtype.itemsize


def prefill_peak_bytes(state, specs, batch: int, prompt_len: int) -> int:
    """Peak KV bytes inside a prefill step (module docstring): layers in order, each at full prompt
    length while the ones before it hold what they kept."""
    layers: dict = {}
    for t, s in zip(state, specs):
        if s.kind != "kv":
            continue
        held, full = layers.get(s.layer, ([], 0))
        layers[s.layer] = ([*held, t], full + batch * prompt_len * per_token_bytes(s))
    order = sorted(layers, key=lambda x: -1 if x is None else x)
    peak, before = 0, 0
    for layer in order:
        tensors, full = layers[layer]
        held = storage_bytes(tensors)
        peak = max(peak, before + max(held, full))
        before += held
    return peak
