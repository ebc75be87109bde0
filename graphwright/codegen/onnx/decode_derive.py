"""``decode.onnx`` without a second export when the decode graph only appends: renamed outputs of ``model.onnx``.

``decode_slots.decode_graph`` turns SnapKV's eviction op into an append at decode
(``snapkv_decode``: it returns its inputs k, v, k_pos unchanged). When that is the *only* change
(no in-graph slot eviction, no capacity, no re-rotation, nothing left split at decode), the decode
graph computes exactly what the prefill graph ``model.onnx`` computes on a T = 1 step, whose
prompt-step eviction ops were cut out (``split.py``): the cut tensors the op read are, at decode,
the next state. So ``derive_append_decode`` writes ``decode.onnx`` as ``model.onnx`` with each cut
output that a SnapKV op passes through renamed to its ``<state>_next`` and every other cut output
(and the nodes only they needed) dropped: no second ``torch.export``, ONNX translation, optimizer
run or weights file (the initializers keep pointing into ``model.onnx.data``). On SmolLM2-135M that
second export was about a quarter of a ``snapkv`` export's CPU time (the demo recipe); measured
under load, see README "Export time".

``model.onnx`` was exported with a dynamic new-token count (example T = 3), so the same ops serve
T = 1; nothing is traced for T = 1 specifically. Anything else (another runtime op, a pass-through
argument that is a graph input or an earlier op's result, a view-op chain, the same cut tensor
feeding two states) returns None and the caller exports the decode graph as before.

Invariant tested (``tests/onnx/test_decode_derive.py``): the derived ``decode.onnx`` of a SnapKV
export passes ``onnx.checker``, shares ``model.onnx.data``, gives the same logits and state on
decode steps as a decode graph exported the long way (1e-5), and ``snapkv_decode`` really returns
its arguments ``PASS_THROUGH``; a recipe with in-graph eviction (H2O) is not derived.
"""

from __future__ import annotations

from pathlib import Path

from ...ops.eviction import EVICT_SNAPKV

# snapkv_decode(q, k, v, q_pos, k_pos, ...) -> (k, v, k_pos): argument index of each output
PASS_THROUGH = (1, 2, 4)


def appends_only(gm, capacity: dict, in_graph: list, left: list) -> bool:
    """True when ``decode_graph``'s result differs from the step graph only by SnapKV appends."""
    from .decode_slots import snapkv_decode

    changed = {n.target for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__module__", "").endswith("decode_slots")}
    return bool(in_graph) and not capacity and not left and set(in_graph) == {EVICT_SNAPKV.name()} and changed == {snapkv_decode}


def renames(records: list) -> dict | None:
    """``{cut output: "<state>_next"}`` for the prefill records, or None when one is not a plain SnapKV pass-through."""
    out = {}
    for rec in records:
        if rec["op"] != EVICT_SNAPKV.name() or rec.get("derived") or len(rec["results"]) != len(PASS_THROUGH):
            return None
        for i, state in zip(PASS_THROUGH, rec["results"]):
            src = rec["args"][i]
            if state is None or "output" not in src or src["output"] in out:
                return None
            out[src["output"]] = f"{state}_next"
    return out


def derive_append_decode(folder: Path, model_file: str, decode_file: str, outputs: list, records: list,
                         wanted: list) -> bool:
    """Write ``folder/decode_file`` from ``folder/model_file`` (module docstring); False (nothing written)
    when the records do not allow it. ``outputs``: model.onnx's outputs; ``wanted``: the decode graph's
    outputs (logits, then every ``<state>_next`` in state order)."""
    import onnx

    names = renames(records)
    if not names:  # nothing cut (in-graph prompt eviction: derive_from_appends) or not a plain pass-through
        return False
    have = set(outputs) | set(names.values())
    if any(w not in have for w in wanted) or any(v in outputs for v in names.values()):
        return False
    m = onnx.load(str(folder / model_file), load_external_data=False)
    g = m.graph
    taken = {i.name for i in g.input} | {x for n in g.node for x in n.output} | {t.name for t in g.initializer}
    if any(c in {i.name for i in g.input} for c in names) or any(v in taken for v in names.values()):
        return False
    for node in g.node:
        for j, x in enumerate(node.output):
            if x in names:
                node.output[j] = names[x]
        for j, x in enumerate(node.input):
            if x in names:
                node.input[j] = names[x]
    for vi in g.value_info:
        if vi.name in names:
            vi.name = names[vi.name]
    by_name = {o.name: o for o in g.output}
    for old, new in names.items():
        by_name[old].name = new
        by_name[new] = by_name.pop(old)
    kept = [by_name[w] for w in wanted]
    del g.output[:]
    g.output.extend(kept)
    _drop_dead_nodes(g)
    onnx.save(m, str(folder / decode_file))
    return True


def derive_from_appends(folder: Path, model_file: str, decode_file: str, appends: dict, wanted: list) -> bool:
    """Write ``folder/decode_file`` from ``folder/model_file`` whose SnapKV ops run in the graph
    (``prompt_slots.append_outputs``): each ``<state>_append`` output becomes ``<state>_next``, the
    prompt step's ``<state>_next`` (the compacted cache) and the nodes only it needed are dropped.
    Then ``model_file`` is rewritten without the ``_append`` outputs. False (nothing written) when
    an output is missing."""
    import onnx

    path = folder / model_file
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    have = {o.name for o in g.output}
    if not appends or any(a not in have or n not in have for n, a in appends.items()):
        return False
    rename = {**{n: n + "__prompt" for n in appends}, **{a: n for n, a in appends.items()}}
    _rename_values(g, rename)
    by_name = {o.name: o for o in g.output}
    if any(w not in by_name for w in wanted):
        return False
    kept = [by_name[w] for w in wanted]
    del g.output[:]
    g.output.extend(kept)
    _drop_dead_nodes(g)
    onnx.save(m, str(folder / decode_file))
    strip_outputs(path, set(appends.values()))
    return True


def strip_outputs(path: Path, names: set) -> None:
    """Rewrite the ONNX file at ``path`` without the graph outputs ``names`` (weights stay external)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    kept = [o for o in m.graph.output if o.name not in names]
    del m.graph.output[:]
    m.graph.output.extend(kept)
    _drop_dead_nodes(m.graph)
    onnx.save(m, str(path))


def _rename_values(g, rename: dict) -> None:
    """Rename values (node inputs/outputs, value_info, graph outputs) by ``rename`` at once."""
    for node in g.node:
        for j, x in enumerate(node.output):
            node.output[j] = rename.get(x, x)
        for j, x in enumerate(node.input):
            node.input[j] = rename.get(x, x)
    for vi in [*g.value_info, *g.output]:
        vi.name = rename.get(vi.name, vi.name)


def _drop_dead_nodes(g) -> None:
    """Remove the nodes no graph output needs (the dropped cut outputs' producers), keeping the order."""
    need = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(x in need for x in node.output):
            keep.append(node)
            need.update(x for x in node.input if x)
            for attr in node.attribute:  # subgraphs read outer-scope names
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    need.update(x for n in sub.node for x in n.input if x)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    used = need
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
