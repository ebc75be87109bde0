"""The graph/runtime split for KV-eviction ops: the artifact stops at each eviction op's inputs.

Scope: the prompt steps (``model.onnx``) of the ops ``prompt_slots.py`` leaves split (FastGen, latent
caches, SnapKV + ThinK, the scored policies, Keyformer, Scissorhands; StreamingLLM, H2O and SnapKV
evict in the graph there), and the decode steps of the policies that have no in-graph decode
translation. ``decode_slots.py`` writes a second graph, ``decode.onnx``, for single-token steps in
which H2O (token-count and fraction budgets), StreamingLLM and FastGen evict on slots (latent caches
included, except FastGen there), ``evict(score=h2o|knorm|keydiff|tova, when="decode")``, Scissorhands
and Keyformer with ``noise="none"`` too (``decode_policies.py``), and SnapKV appends, so a decode step
of those recipes is one session run with nothing cut. Left to this split at decode (each with its
reason in ``graphwright.json["decode"]["split"]``): FastGen and the scored policies on a latent
cache, ``evict`` schedules other than ``when="decode"``, ChunkKV, ``rule="pyramid"``, the prefill
scorers, Keyformer's Gumbel noise (a CPU generator stream by compacted index), ops with no decode
translation, and ops whose outputs reach the state through view ops other than a latent payload's.

Why a split and not an in-graph translation: an eviction op's output length is data dependent
(the largest kept count over rows and heads, an unbacked size in ``torch.export``), and its
selection has input-dependent control flow (FastGen profiles once at prefill, SnapKV only
compresses the prompt). ONNX can express the pieces (TopK with a runtime k, GatherElements), but
the exporter cannot yet carry unbacked output sizes from a custom op's translation into the
state outputs. So ``split`` rewrites a copy of the step graph: every ``graphwright.evict_*`` node
is removed, the tensors it read become extra graph outputs (``cut<i>``), and the state outputs
it produced leave the graph. The ONNX Runtime step (``codegen/onnx/artifact.py::OnnxStep``) runs the
session, then calls the same custom op (whose torch implementation is the reference) on the cut
tensors, so the cache it keeps is bit-for-bit what the torch runtime keeps.

``graphwright.json`` records each cut op as ``{"op", "layer", "args": [{"output": name} |
{"input": name} | {"value": v} | {"result": [record index, output index]}], "results": [state name | None
per op output], "derived": [...]}``. A ``result`` argument is an earlier cut op's output (``snapkv + think``:
the kept cache feeds ThinK's split); the records run in order.
An op output may also reach the state through a chain of view ops (a latent layer's shared
payload is selected and sliced into c_k and c_v): ``derived`` lists ``{"from": output index,
"ops": [[aten op name, [constant args]], ...], "state": name}``, applied in torch after the op.
"""

from __future__ import annotations

import copy
import operator

import torch

from ...ops.eviction import EVICT_OPS
from ...ops.think import THINK_PRUNE

RUNTIME_OPS = set(EVICT_OPS) | {THINK_PRUNE}  # ThinK's channel choice and cache split: once after prefill
# shape-only ops allowed between a runtime op's output and the state it produces
VIEW_OPS = {op.name(): op for op in (torch.ops.aten.select.int, torch.ops.aten.slice.Tensor,
                                      torch.ops.aten.squeeze.dim, torch.ops.aten.unsqueeze.default,
                                      torch.ops.aten.view.default, torch.ops.aten.reshape.default)}


def _positional(node) -> list:
    """The node's arguments in schema order: keyword arguments (``schema.call`` passes those with defaults by
    name, e.g. ``evict_adakv_scored``'s head-share ``weights``) placed at their positions, defaults filled in."""
    if not node.kwargs:
        return list(node.args)
    out = list(node.args)
    for a in node.target._schema.arguments[len(node.args):]:
        if a.name in node.kwargs:
            out.append(node.kwargs[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            raise ValueError(f"{node.target}: argument {a.name!r} missing for the graph/runtime split")
    unknown = set(node.kwargs) - {a.name for a in node.target._schema.arguments}
    if unknown:
        raise ValueError(f"{node.target}: unknown keyword arguments {sorted(unknown)} for the graph/runtime split")
    return out


def split(gm: torch.fx.GraphModule, input_names: list, state_names: list):
    """A copy of ``gm`` without its runtime ops, and the records that let the runtime apply them.

    ``input_names``: graph input names in placeholder order; ``state_names``: state names in
    output order (after the logits). Returns ``(gm, records, output_names)``.
    """
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph = gm.graph
    placeholders = {n: input_names[i] for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    out_node = next(n for n in graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    names = ["logits", *(f"{s}_next" for s in state_names)]
    cut_nodes, records, produced, erase = [], [], {}, []
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in RUNTIME_OPS]:
        args = []
        for a in _positional(node):
            if isinstance(a, torch.fx.Node):
                if a in produced:  # an earlier runtime op's output (snapkv's kept cache feeding think_prune)
                    args.append({"result": list(produced[a])})
                elif a in placeholders:
                    args.append({"input": placeholders[a]})
                else:
                    if a not in cut_nodes:
                        cut_nodes.append(a)
                    args.append({"output": f"cut{cut_nodes.index(a)}"})
            elif isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in a):
                raise ValueError(f"{node.target}: list arguments of tensors are not supported by the split")
            else:
                args.append({"value": a})
        for user in node.users:
            if user.target is not operator.getitem:
                raise ValueError(f"{node.target} (layer {node.meta.get('graphwright', {}).get('layer')}): its outputs "
                                 "feed more than the next step's state; the graph/runtime split cannot cut it")
        n_out = len(node.meta["val"]) if isinstance(node.meta.get("val"), (list, tuple)) else \
            1 + max((u.args[1] for u in node.users), default=-1)
        results, derived, chain = [None] * n_out, [], []

        def walk(src, index, ops):
            """Follow ``src`` through view ops to the state outputs it becomes."""
            for user in list(src.users):
                if user is out_node:
                    for j, o in enumerate(outs):
                        if o is src:
                            if ops:
                                derived.append({"from": index, "ops": ops, "state": state_names[j - 1]})
                            else:
                                results[index] = state_names[j - 1]
                            outs[j] = None
                elif user.op == "call_function" and user.target in RUNTIME_OPS and not ops:
                    produced[src] = (len(records), index)  # a later runtime op reads it: runs after this one
                elif (user.op == "call_function" and getattr(user.target, "name", lambda: None)() in VIEW_OPS
                      and user.args[0] is src and not user.kwargs
                      and not any(isinstance(a, torch.fx.Node) for a in user.args[1:])):
                    chain.append(user)
                    walk(user, index, ops + [[user.target.name(), list(user.args[1:])]])
                else:
                    raise ValueError(f"{node.target} (layer {node.meta.get('graphwright', {}).get('layer')}): its "
                                     f"output {index} feeds {user.target}, not only the next step's state; the "
                                     "graph/runtime split cannot cut it")

        for user in list(node.users):
            chain.append(user)
            walk(user, user.args[1], [])
        out_node.args = (tuple(outs),)
        erase += [*chain, node]
        records.append({"op": node.target.name(), "layer": node.meta.get("graphwright", {}).get("layer"),
                        "args": args, "results": results, **({"derived": derived} if derived else {})})
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(erase, key=order.get, reverse=True):  # later runtime ops first: they read earlier ones' outputs
        graph.erase_node(n)
    keep = [j for j, o in enumerate(outs) if o is not None]
    out_node.args = (tuple([outs[j] for j in keep] + cut_nodes),)
    graph.lint()
    gm.recompile()
    return gm, records, [names[j] for j in keep] + [f"cut{i}" for i in range(len(cut_nodes))]


def references() -> dict:
    """Qualified op name -> pure-torch reference (what the torch runtime's lowering runs too)."""
    from ...ops.eviction import REFERENCES

    return {op.name(): fn for op, fn in REFERENCES.items()}


def run_records(records: list, outputs: dict, inputs: dict) -> dict:
    """Apply the cut ops with their references -> {state name: tensor}."""
    refs = references()
    state, done = {}, []
    for rec in records:
        args = [outputs[a["output"]] if "output" in a else inputs[a["input"]] if "input" in a
                else done[a["result"][0]][a["result"][1]] if "result" in a else a["value"] for a in rec["args"]]
        if rec["op"] not in refs:
            raise ValueError(f"runtime op {rec['op']!r} has no reference here; known: {sorted(refs)}")
        res = refs[rec["op"]](*args)
        res = res if isinstance(res, (list, tuple)) else (res,)
        done.append(res)
        for r, tensor in zip(rec["results"], res):
            if r is not None:
                state[r] = tensor
        for d in rec.get("derived", ()):
            t = res[d["from"]]
            for name, op_args in d["ops"]:
                if name not in VIEW_OPS:
                    raise ValueError(f"runtime op {rec['op']!r}: unknown view op {name!r}; known: {sorted(VIEW_OPS)}")
                t = VIEW_OPS[name](t, *op_args)
            state[d["state"]] = t
    return state
