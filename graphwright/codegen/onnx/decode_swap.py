"""``decode.onnx`` of H2O / DuoAttention recipes without tracing the body again: ``model.onnx`` with its slot functions swapped.

``slot_functions.wrap`` leaves one opaque ``graphwright.slots`` node per layer in the saved, not yet
stitched ``model.onnx``: the prompt step's eviction (``prompt_slots.h2o_prompt``, ``streaming_prompt``). The decode graph
(``decode_slots.decode_graph``) is the same step graph with that node's target swapped for the decode
function (``decode_slots.h2o_decode``, ``streaming_decode``), called with the *same* arguments and
returning the same values (k, v, k_pos[, score]); nothing else in the body differs when no layer
re-rotates its cache (H2O, DuoAttention's streaming heads, which attend with the ordinary attention). So ``derive_swapped`` writes
``decode.onnx`` as the un-stitched ``model.onnx`` with each such node's op type set to a new key
whose function is the decode partner, then stitches those functions in (``slot_functions.stitch``):
no second ``torch.export``, ONNX translation, optimizer run or weights file for the body (on
SmolLM2-135M that second body export was about 30 CPU s of an H2O export, README "Export time").

What changes besides the node types: the decode function's own export example (``decode_example``:
the prompt function's recorded example with one query token, ``q`` [B, H, 1, D], ``q_pos`` [B, 1],
and the running score one slot shorter than the cache, as ``torch.export`` of the decode graph
would have recorded it), and the types of the values the swapped nodes produce (the prompt
function's kept width ``min(S, c)`` is the state's own width S at decode): their ``value_info`` is
dropped and each ``<state>_next`` output takes the type of its ``<state>`` input.

``model.onnx`` was exported with a dynamic new-token count (example T = 3), so its body serves
T = 1 steps as it does for SnapKV's derived decode graph (``decode_derive.py``). Only used when
``swappable`` holds: every eviction op in the graph at both steps, nothing split, no host input, and
every Python function of the decode graph a partner (no re-rotation, no fused attention + eviction of
another rewrite); anything else exports the decode graph the long way. StreamingLLM (``streaming(...)``, position shift) is not swapped: its decode
attention differs from the prompt step's (``streaming_shift.shifted_decode_attention`` vs
``invert_slots`` + ``rope_cache_index`` + attention, which are several nodes of ``model.onnx``, the
last two traced and translated, not one slot function).

Exact: the decode functions are the same torch functions exported the same way; the body is
``model.onnx``'s. Invariant tested (``tests/onnx/test_slot_functions.py``, ``tests/onnx/test_decode_swap.py``):
the swapped ``decode.onnx`` passes ``onnx.checker``, shares ``model.onnx.data`` and gives the same
tokens, logits (1e-5) and state over 40 decode steps as the decode graph exported layer by layer
(H2O token counts and fractions, tiny Llama, batch 2 left-padded); DuoAttention artifacts
(``test_duo_packed_onnx.py``) generate the torch runtime's tokens.
"""

from __future__ import annotations

import inspect
from pathlib import Path

ENABLED = True  # False: the decode graph is exported the long way (A/B in bench/export_time.py --swap-ab)
# prompt function -> decode function with the same arguments and outputs
PARTNERS = {"h2o_prompt": "h2o_decode", "streaming_prompt": "streaming_decode"}
# the functions of decode_graph's modules a swappable decode graph may contain (the partners)
DECODE_TARGETS = set(PARTNERS.values())


def wanted(keys: list) -> bool:
    """Whether ``model.onnx``'s un-stitched graph is worth keeping: it has a prompt function with a decode partner."""
    from .slot_functions import KEYS

    return ENABLED and any(KEYS[k]["name"] in PARTNERS for k in keys)


def keep(keys: list) -> dict:
    """The entries of ``keys`` (copies: ``stitch`` forgets them) for ``derive_swapped``."""
    from .slot_functions import KEYS

    return {k: dict(KEYS[k]) for k in keys}


def swappable(gm, capacity: dict, in_graph: list, left: list, prompt: dict) -> bool:
    """True when ``decode_graph``'s result differs from the prompt graph only by partner swaps (module docstring)."""
    if left or prompt.get("split") or gm.meta.get("host_inputs") or not in_graph:
        return False
    # every Python function of the decode graph (ATen and graphwright ops are OpOverloads, not functions) must be a
    # partner: any other decode rewrite (another module's fused attention + eviction, a re-rotation) is not a plain swap
    fns = {n.target for n in gm.graph.nodes if n.op == "call_function" and inspect.isfunction(n.target)}
    if any(f not in _partner_functions() for f in fns):
        return False
    names = {f.__name__ for f in fns}
    prompt_ops = sorted(r["op"] for r in prompt.get("in_graph") or ())
    return bool(names) and names <= DECODE_TARGETS and len(prompt_ops) == len(in_graph) and prompt_ops == sorted(in_graph)


def _partner_functions() -> set:
    from .decode_slots import h2o_decode, streaming_decode

    return {h2o_decode, streaming_decode}


def decode_example(entry: dict) -> list:
    """The decode partner's export example from the prompt function's recorded one: one query token
    (``q`` dim 2 and ``q_pos`` dim 1 set to 1, static), the running ``score`` one slot shorter than ``k_pos``."""
    tensors = {v: p for p, (kind, v) in zip(entry["params"], entry["template"]) if kind == "t"}
    example = [list(x) for x in entry["example"]]
    kp = next(i for i, p in tensors.items() if p == "k_pos")
    out = []
    for i, (dtype, sizes, dims) in enumerate(example):
        sizes, dims = list(sizes), list(dims)
        name = tensors[i]
        if name in ("q", "q_pos"):
            d = 2 if name == "q" else 1
            sizes[d], dims = 1, [x for x in dims if x != d]
        elif name == "score":
            sizes[2] = example[kp][1][2] - 1
        out.append((dtype, sizes, dims))
    return out


def derive_swapped(folder: Path, model, entries: dict, decode_file: str, opset: int) -> dict:
    """Write ``folder/decode_file`` from ``model`` (the un-stitched ``model.onnx`` ModelProto, not modified) with
    every partnered slot node swapped and the decode functions stitched in; returns ``{prompt key: decode key}``.
    Raises when a ``graphwright.slots`` node has no partner (the caller exports the decode graph the long way)."""
    import copy

    from . import slot_functions as sf
    from .decode_slots import h2o_decode, streaming_decode

    fns = {"h2o_decode": h2o_decode, "streaming_decode": streaming_decode}
    m = copy.deepcopy(model)
    g = m.graph
    swap = {}
    for key, entry in entries.items():
        partner = PARTNERS.get(entry["name"])
        if partner is None:
            raise ValueError(f"slot function {key} ({entry['name']}) has no decode partner")
        new = f"{partner}_{next(sf._NUMBERS)}"
        sf.KEYS[new] = {"fn": fns[partner], "name": partner, "params": list(entry["params"]),
                        "template": list(entry["template"]), "example": decode_example(entry), "dtypes": None}
        swap[key] = new
    try:
        produced = set()
        for node in g.node:
            if node.domain == sf.DOMAIN:
                if node.op_type not in swap:
                    raise ValueError(f"graphwright.slots node {node.op_type} has no decode partner")
                node.op_type = swap[node.op_type]
                produced.update(node.output)
        _drop_value_info(g, produced)
        types = {i.name: i.type for i in g.input}
        for o in g.output:
            src = o.name[:-len("_next")] if o.name.endswith("_next") else None
            if src in types:
                o.type.CopyFrom(types[src])
        sf.stitch(folder / decode_file, list(swap.values()), opset, model=m)
    finally:
        sf.forget(swap.values())
    return swap


def _drop_value_info(g, produced: set) -> None:
    """Drop the recorded types of ``produced`` and of everything computed from them (their widths change)."""
    changed = set(produced)
    for node in g.node:  # topological order
        if any(x in changed for x in node.input):
            changed.update(node.output)
    keep = [vi for vi in g.value_info if vi.name not in changed]
    del g.value_info[:]
    g.value_info.extend(keep)
