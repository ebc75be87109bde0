"""Eviction ops with no static decode translation: run eagerly right after the compiled decode step.

The compiled backend (``compiled.py``) runs decode as one ``torch.compile``d graph over static
buffers. H2O / StreamingLLM with token counts evict inside it (``static_eviction.py``); the other
per-head eviction ops have no fixed-capacity translation (data-dependent kept sets, compaction):
the generic scored op (``evict(score=...)``: ``evict_scored``, ``_acc``, ``_rope``, ``_reuse``),
Keyformer, Scissorhands, FastGen and H2O with fraction budgets. ``eager_fallback_rewrite`` cuts them out of the compiled graph, the way
the ONNX export splits its runtime ops (``codegen/onnx/split.py``), and ``run_fallback`` applies them
after each compiled call with their pure-torch references (what the torch backend runs for them):

* in the compiled graph the layer's caches stay append-only static buffers (its ``cache_append`` s
  become slot writes like any dense layer's, at the state's shared slot ``filled``); the op's state
  outputs are wired to its inputs (the appended buffer, or the state input itself for a running
  per-slot score the op extends), and every other tensor the op reads (queries, this step's keys
  after the write, the rotary table, key bias) becomes an extra graph output (a graph break at the
  end of the step: nothing in the compiled graph reads an eager op's result);
* after the call the references run in graph order (ChunkKV's reuse op reads its leader's kept
  positions: an earlier record's result) on the state buffers narrowed to the torch backend's widths
  (``filled + 1`` after this step's write, ``filled`` for a per-slot score the op extends), so a reference
  sees exactly the torch backend's tensors; a result of width W is copied back into the front of its
  buffer and the rest emptied (position -1, zeros), and the state's ``filled`` becomes W: the width and
  slot order of the torch backend's state, so ties break alike and the tokens are the torch backend's;
* per-head state that is not per slot (Keyformer's frozen budgets ``meta``, Scissorhands' ``step``)
  is replaced by the op's output as it is (no capacity, never bucketed).

So these layers' eviction is eager and synchronises with the host (``bool(do.any())`` in the
references) once per layer and step; the rest of the step (every matmul, attention, RoPE, norms)
stays compiled. FastGen and H2O with fraction budgets (no fixed capacity: the kept count depends on
the data or grows with the row) run here too (``runs_eagerly``), with the compacting references, while
the torch backend evicts them on unordered slots (``eviction_slots.py``, tested to keep the references'
sets): same kept sets, logits equal up to summation order. Still refused (``static_eviction._reason``):
the packed Ada-KV caches (``evict_adakv``, ``evict_adakv_scored``: a decode step appends one entry per
KV head to one packed row and the attention reads the cache expanded to every head, which the
shared-slot buffers do not model), and eviction on latent caches (the op's outputs reach the latent
states through ``select`` views, not as the next state itself).

Invariant tested (``tests/codegen/test_compiled_fallback.py``): on tiny Llama, a left-padded batch
of 2, 45 decode steps, ``backend="compiled"`` (Inductor, and the same graph eagerly) keeps the torch
backend's position sets per (row, layer, KV head) after every step, logits <= 1e-4 and the same greedy
tokens for evict(score=tova decode / keydiff every:4 / h2o decode / expected_attention / chunkkv with
chunk_reuse=2), Keyformer (Gumbel noise), Scissorhands, FastGen and H2O with fraction budgets; and
``evict(score='keydiff', block=4)`` (the prompt in blocks, a 1-token first block included). Not knorm in that test: RoPE keeps a key's norm,
so a repeated token ties exactly, and the compiled decode linears (not the torch backend's GEMV weight
copies) round such a tie either way (seen: norms 6.6808467 vs 6.6808462).
"""

from __future__ import annotations

import operator

import torch

from ...ops import schema
from ...ops.eviction import (
    EVICT_FASTGEN,
    EVICT_H2O,
    EVICT_KEYFORMER,
    EVICT_SCISSORHANDS,
    EVICT_SCORED,
    EVICT_SCORED_ACC,
    EVICT_SCORED_ROPE,
    POLICIES,
    REFERENCES,
)
from ...ops.policy_scored import EVICT_SCORED_LAG, EVICT_SCORED_QFILTER, EVICT_SCORED_REUSE, EVICT_SCORED_WO
from .cache_append import cache_append

# ops the compiled backend runs eagerly after its compiled decode graph (their torch-backend implementation is the reference)
EAGER_OPS = (EVICT_SCORED, EVICT_SCORED_ACC, EVICT_SCORED_ROPE, EVICT_SCORED_REUSE, EVICT_SCORED_WO, EVICT_KEYFORMER,
             EVICT_SCISSORHANDS, EVICT_SCORED_LAG, EVICT_SCORED_QFILTER)


def runs_eagerly(o: torch.fx.Node) -> bool:
    """Whether the runtime graph's eviction node ``o`` runs after the compiled step (``EAGER_OPS``, FastGen, H2O with
    fraction budgets: their kept count depends on the data or the row length, so no fixed-capacity slot buffer)."""
    if o.target in EAGER_OPS or o.target is EVICT_FASTGEN:
        return True
    return o.target is EVICT_H2O and bool(schema.get(o, "heavy_f") or schema.get(o, "recent_f"))


class FallbackNotPossible(ValueError):
    """An eager-fallback op whose outputs feed more than the next step's state (the message says which)."""


def _head_args(op) -> set:
    """Argument names of an op's per-head (not per-slot) state: Keyformer's ``meta``, Scissorhands' ``step``."""
    for p in POLICIES.values():
        if p.op is op:
            return {h.arg for h in p.head_state}
    return set()


def eager_fallback_rewrite(graph: torch.fx.Graph, orig_graph: torch.fx.Graph, num_state: int) -> dict:
    """Cut the ``EAGER_OPS`` nodes out of the lowered decode ``graph`` (in place; see the module docstring).

    Call before ``slots_from_appends`` (it reads the ``cache_append`` nodes). Returns ``{"records": [...],
    "cut": number of extra graph outputs, "kinds": {state index: "append" | "slot" | "head"}}``: ``append``
    states are appended in the graph (slot writes), ``slot`` states are per-slot state the op extends itself
    (no append in the graph: skip them in ``slots_from_appends``), ``head`` states are replaced as they are."""
    orig = {n.name: n for n in orig_graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    states = placeholders[3:3 + num_state]
    out = next(n for n in graph.nodes if n.op == "output")
    outs = list(out.args[0])
    records, cut, produced, erase, kinds = [], [], {}, [], {}
    for node in list(graph.nodes):
        o = orig.get(node.name)
        if node.op != "call_function" or o is None or o.op != "call_function" or not runs_eagerly(o):
            continue
        where = f"{o.target.name()} (layer {o.meta.get('graphwright', {}).get('layer')})"
        names = schema.arg_names(o.target)
        values = [node.args[i] if i < len(node.args) else node.kwargs[n] if n in node.kwargs else schema.get(o, n)
                  for i, n in enumerate(names)]
        heads = _head_args(o.target)
        args = []
        for name, v in zip(names, values):
            if not isinstance(v, torch.fx.Node):
                args.append(("value", v, None))
            elif v in produced:
                args.append(("result", produced[v], None))
            elif v.op == "placeholder":  # a state read as it was before the step (a per-slot score): its width then
                args.append(("input", v.name, ("before", states.index(v)) if v in states and name not in heads else None))
            else:
                if v not in cut:
                    cut.append(v)
                own = v.target is cache_append and v.args[0] in states  # a cache after this step's write: its width then
                args.append(("cut", cut.index(v), ("after", states.index(v.args[0])) if own else None))
        results = {}
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise FallbackNotPossible(f"{where}: its output feeds {user.target}, not only the next step's state")
            i = user.args[1]
            for uu in list(user.users):
                if uu is out:
                    for j in [j for j in range(num_state) if outs[1 + j] is user]:
                        results[i] = j
                        outs[1 + j], kinds[j] = _own_input(values, names, heads, states[j], where)
                elif uu.op == "call_function" and orig.get(uu.name) is not None and runs_eagerly(orig[uu.name]):
                    produced[user] = (len(records), i)
                else:
                    raise FallbackNotPossible(f"{where}: its output {i} feeds {uu.target}, not only the next step's state")
            erase.append(user)
        erase.append(node)
        records.append({"op": o.target, "where": where, "args": args, "results": results})
    out.args = (tuple(outs) + tuple(cut),)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(erase, key=order.get, reverse=True):
        graph.erase_node(n)
    graph.lint()
    return {"records": records, "cut": len(cut), "kinds": kinds}


def _own_input(values, names, heads, state, where):
    """(node the state output is wired to, kind): the op's argument that is ``cache_append(state, ...)``
    (``append``) or the state input itself (``head`` for per-head state, else ``slot``)."""
    for v in values:
        if isinstance(v, torch.fx.Node) and v.target is cache_append and v.args[0] is state:
            return v, "append"
    for name, v in zip(names, values):
        if v is state:
            return state, "head" if name in heads else "slot"
    raise FallbackNotPossible(f"{where}: state {state.name} is neither appended to nor read by the op (a latent or "
                              "rewritten cache)")


def run_fallback(plan: dict, cut: list, inputs: dict, width) -> dict:
    """Apply the cut ops with their references -> {state index: result tensor}. ``cut``: the compiled
    graph's extra outputs; ``inputs``: placeholder name -> tensor (the step's inputs and state buffers);
    ``width(tensor, (when, state index))``: a state buffer narrowed to the width the torch backend's state has
    ``before`` or ``after`` this step's append (the reference then sees exactly its tensors: Keyformer's
    Gumbel noise is drawn for the cache's width)."""
    done, new = [], {}
    for rec in plan["records"]:
        args = []
        for kind, v, own in rec["args"]:
            t = v if kind == "value" else inputs[v] if kind == "input" else cut[v] if kind == "cut" else done[v[0]][v[1]]
            args.append(width(t, own) if own is not None else t)
        res = REFERENCES[rec["op"]](*args)
        done.append(res)
        for i, j in rec["results"].items():
            new[j] = res[i]
    return new
