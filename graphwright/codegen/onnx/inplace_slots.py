"""Slot caches written in place on ONNX Runtime: a donated decode state's new K/V rows land in its own buffers.

An evicting layer's decode step (``decode_slots.py``) keeps its K/V state at a fixed capacity and writes the new
token's row into one slot per (row, KV head): ``<name>_next = ScatterElements(<name>, index, row)``. Bound to a
fresh output buffer (``OnnxStep._run_bound``), that ScatterElements first copies the whole input: every layer's
whole cache, K and V, at every step (SmolLM2-135M, StreamingLLM at 1,024 slots, 4k prompt: ScatterElements 11.3 of
52 ms per step in ``bench/profile_onnx_decode.py``; the attention's S + 1 concatenations another 3.5 ms).
``decode_rows.SPLIT_ROWS`` (on by default) removes those concatenations: the layer's attention reads the old
slots where they are (``attend_split``) and the row is written ``after`` the attention, a data dependency. Then the
scatter is the K/V input's last reader, and ONNX Runtime's CPU ScatterElements skips its input-to-output copy when
the output is bound to the input's own memory (checked in ``inplace_kv.py``: 0.02 ms vs 17.6 ms for 30 MB).

``aliasable(graph, capacity, kinds)`` lists the capacity states for which that is safe, read off the saved graph
(whatever produced it): ``<name>_next`` is a ScatterElements whose data input is the graph input ``<name>``,
and every other node reading ``<name>`` (a subgraph's reads count for the node holding it) is an ancestor of that
ScatterElements, so ONNX Runtime runs it before the write in any topological order. A graph exported before
``SPLIT_ROWS`` (attention over a concatenation of the cache, or a scatter with no dependency on it) has none.

Ownership: writing in place destroys the state the caller passed. ``OnnxStep`` does it only for a donated state
(``donate_state=True``: the caller gives the state up, as ``jax.jit``'s ``donate_argnums``); the runtime's
``generate`` loop donates the state it got from its previous step (a prompt step's outputs, or its own copy of a
reusable context), never a state a user passed in. Without donation the step binds fresh outputs, as before.

Invariant tested (``tests/onnx/test_inplace_slots.py``): on tiny Llama StreamingLLM and H2O artifacts (batch 2,
left-padded, evictions at every step), a donated decode loop gives the same tokens, logits (1e-5) and kept
positions as the undonated one, its K/V buffers stay the same storage from step to step, and a state not donated
is unchanged by the step; ``aliasable`` refuses a graph where another reader of the state does not precede the
scatter (a hand-built graph) and one whose scatter writes another tensor.
"""

from __future__ import annotations

ENABLED = True  # False: donated states are bound to fresh outputs like any other (A/B: bench/ab_onnx_switch.py)


def _reads(node) -> set:
    """The values a node reads: its inputs and, for a node with subgraphs (If, Loop, Scan), every value its
    subgraphs read (outer values are captured by name)."""
    names = {i for i in node.input if i}
    for att in node.attribute:
        graphs = [att.g] if att.HasField("g") else list(att.graphs)
        for g in graphs:
            for n in g.node:
                names |= _reads(n)
    return names


def aliasable(graph, capacity: dict, kinds: dict) -> list:
    """The names of the capacity K/V states (``kinds[name] == "kv"``) whose ``<name>_next`` may be written into
    ``<name>``'s own buffer (module docstring): a list in graph-input order."""
    producer, readers, reads = {}, {}, {}
    for n in graph.node:
        reads[id(n)] = _reads(n)
        for o in n.output:
            producer[o] = n
        for i in reads[id(n)]:
            readers.setdefault(i, []).append(n)
    out = []
    for inp in graph.input:
        name = inp.name
        if name not in capacity or kinds.get(name) != "kv":
            continue
        scatter = producer.get(f"{name}_next")
        if scatter is None or scatter.op_type != "ScatterElements" or scatter.input[0] != name:
            continue
        others = [r for r in readers.get(name, []) if r is not scatter]
        if others and not _all_before(others, scatter, producer, reads):
            continue
        out.append(name)
    return out


def _all_before(nodes: list, target, producer: dict, reads: dict) -> bool:
    """Whether every node of ``nodes`` is an ancestor of ``target`` (reached through the values it reads)."""
    want = {id(n) for n in nodes}
    seen, todo = set(), [target]
    while todo and want:
        n = todo.pop()
        for value in reads[id(n)]:
            p = producer.get(value)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                want.discard(id(p))
                todo.append(p)
    return not want
