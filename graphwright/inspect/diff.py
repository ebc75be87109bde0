"""``gw.inspect.diff(before, after)``: what a recipe changed, node by node, grouped by layer.

Passes rewrite the step graph in place of hand-written model code, so the way to review a pass
is to diff graphs: which nodes it added, removed or replaced in which layer, which state
(KV cache) layouts it changed and which parameters it introduced. Nodes are matched
structurally: by name first (FX keeps names across ``StepGraph.copy()``), then by
(op, target, layer) in graph order, so a node a pass recreated under a new name is not noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .nodes import format_shapes, gw_meta, layer_from_path, layer_map, node_shapes, target_name, unwrap
from .plain import plain_text
from .report import jsonable, spec_bytes_per_token


def _describe(node: torch.fx.Node, layer) -> dict:
    return {"name": node.name, "op": node.op, "target": target_name(node), "shapes": node_shapes(node),
            "variant": gw_meta(node).get("variant"), "layer": layer}


def _args_signature(node: torch.fx.Node) -> str:
    """Arguments with input nodes replaced by their shapes: what changes when constants or input
    shapes change (re-wiring is checked separately, through the node matching)."""
    def sub(a):
        return f"%{format_shapes(node_shapes(a))}" if isinstance(a, torch.fx.Node) else a

    return repr((torch.fx.node.map_aggregate(node.args, sub), torch.fx.node.map_aggregate(dict(node.kwargs), sub)))


def _match(before: list, after: list, lb: dict, la: dict) -> dict:
    """before node -> after node: same name, else same (op, target, layer) in order."""
    by_name = {n.name: n for n in after}
    pairs = {n: by_name[n.name] for n in before if n.name in by_name}
    used = set(pairs.values())
    pending: dict = {}
    for n in after:
        if n not in used:
            pending.setdefault((n.op, target_name(n), la[n]), []).append(n)
    for n in before:
        if n not in pairs:
            queue = pending.get((n.op, target_name(n), lb[n]))
            if queue:
                pairs[n] = queue.pop(0)
    return pairs


def _get_attr_shape(gm, target: str, node):
    obj = gm
    try:
        for part in target.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        obj = node.meta.get("val")
    if isinstance(obj, torch.Tensor):
        return list(obj.shape), str(obj.dtype).replace("torch.", "")
    return None, None


def _params(gm) -> dict:
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            shape, dtype = _get_attr_shape(gm, str(n.target), n)
            out[target_name(n)] = {"shape": shape, "dtype": dtype}
    return out


def _spec(spec) -> dict:
    d = {"kind": spec.kind, "shape": list(spec.shape), "dtype": str(spec.dtype).replace("torch.", ""),
         "seq_dim": spec.seq_dim, "layer": spec.layer}
    if spec.kind == "kv":
        d["bytes_per_token"] = spec_bytes_per_token(spec)
    return d


def _layer_key(layer):
    return "model" if layer is None else layer


@dataclass
class GraphDiff:
    """Node, state and parameter changes between two graphs. Empty when nothing structural changed."""

    # {"change": added|removed|replaced, "layer", "name", "before", "after", "why"}; why lists what
    # differs in a replaced node: target, variant, shape (outputs), args (constants, input shapes),
    # inputs (wired to other nodes)
    nodes: list = field(default_factory=list)
    state: list = field(default_factory=list)  # {"change", "name", "layer", "before", "after"}
    parameters: list = field(default_factory=list)  # {"change", "target", "layer", "before", "after"}

    @property
    def is_empty(self) -> bool:
        return not (self.nodes or self.state or self.parameters)

    def by_layer(self) -> dict:
        """Node changes grouped by layer (int) or ``"model"`` for embeddings, head and inputs."""
        out: dict = {}
        for c in self.nodes:
            out.setdefault(_layer_key(c["layer"]), []).append(c)
        return dict(sorted(out.items(), key=lambda kv: (kv[0] == "model", kv[0] if kv[0] != "model" else 0)))

    def counts(self) -> dict:
        out = {"added": 0, "removed": 0, "replaced": 0}
        for c in self.nodes:
            out[c["change"]] += 1
        out["state"] = len(self.state)
        out["parameters"] = len(self.parameters)
        return out

    def to_dict(self) -> dict:
        return jsonable({"is_empty": self.is_empty, "counts": self.counts(),
                         "layers": {str(k): v for k, v in self.by_layer().items()},
                         "state": self.state, "parameters": self.parameters})

    # ----- rendering -----------------------------------------------------------------------
    @staticmethod
    def _node_cell(d) -> str:
        if d is None:
            return ""
        v = f" [{d['variant']}]" if d.get("variant") else ""
        return f"{d['name']}: {d['target']} {format_shapes(d['shapes'])}{v}"

    def __rich_console__(self, console, options):
        c = self.counts()
        head = Text(f"graph diff: {c['added']} added, {c['removed']} removed, {c['replaced']} replaced nodes; "
                    f"{c['state']} state and {c['parameters']} parameter changes", style="bold")
        if self.is_empty:
            yield Group(head, Text("no changes"))
            return
        parts = [head]
        if self.nodes:
            t = Table(box=box.SIMPLE_HEAD, title="nodes", title_justify="left")
            for col in ("Layer", "Change", "Before", "After", "Why"):
                t.add_column(col, overflow="fold")
            style = {"added": "green", "removed": "red", "replaced": "yellow"}
            for layer, changes in self.by_layer().items():
                for i, ch in enumerate(changes):
                    t.add_row(str(layer) if i == 0 else "", ch["change"], self._node_cell(ch["before"]),
                              self._node_cell(ch["after"]), ",".join(ch["why"]), style=style[ch["change"]],
                              end_section=i == len(changes) - 1)
            parts.append(t)
        for title, rows, key in (("state", self.state, "name"), ("parameters", self.parameters, "target")):
            if not rows:
                continue
            t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
            for col in ("Layer", "Change", "Name", "Before", "After"):
                t.add_column(col, overflow="fold")
            for r in rows:
                t.add_row(str(_layer_key(r["layer"])), r["change"], r[key],
                          "" if r["before"] is None else _fmt(r["before"]), "" if r["after"] is None else _fmt(r["after"]))
            parts.append(t)
        yield Group(*parts)

    def __str__(self) -> str:
        return plain_text(self)

    __repr__ = __str__


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items() if k not in ("layer",) and v is not None)


def diff(before, after) -> GraphDiff:
    """Structural diff of two ``CompiledModel`` / ``StepGraph`` / ``torch.fx.GraphModule`` graphs."""
    gm_b, sg_b = unwrap(before)
    gm_a, sg_a = unwrap(after)
    lb, la = layer_map(before), layer_map(after)
    nb, na = list(gm_b.graph.nodes), list(gm_a.graph.nodes)
    pairs = _match(nb, na, lb, la)
    out = GraphDiff()

    matched_after = set(pairs.values())
    for n in nb:
        m = pairs.get(n)
        if m is None:
            out.nodes.append({"change": "removed", "layer": lb[n], "name": n.name, "before": _describe(n, lb[n]),
                              "after": None, "why": []})
            continue
        why = []
        if target_name(n) != target_name(m) or n.op != m.op:
            why.append("target")
        if gw_meta(n).get("variant") != gw_meta(m).get("variant"):
            why.append("variant")
        if node_shapes(n) != node_shapes(m):
            why.append("shape")
        if _args_signature(n) != _args_signature(m):
            why.append("args")
        if [pairs.get(i) for i in n.all_input_nodes] != list(m.all_input_nodes):
            why.append("inputs")
        if why:
            out.nodes.append({"change": "replaced", "layer": la[m], "name": m.name, "before": _describe(n, lb[n]),
                              "after": _describe(m, la[m]), "why": why})
    for m in na:
        if m not in matched_after:
            out.nodes.append({"change": "added", "layer": la[m], "name": m.name, "before": None,
                              "after": _describe(m, la[m]), "why": []})

    if sg_b is not None and sg_a is not None:
        sb, sa = {s.name: _spec(s) for s in sg_b.state}, {s.name: _spec(s) for s in sg_a.state}
        for name in list(sb) + [k for k in sa if k not in sb]:
            b, a = sb.get(name), sa.get(name)
            if b != a:
                change = "added" if b is None else "removed" if a is None else "changed"
                out.state.append({"change": change, "name": name, "layer": (a or b)["layer"], "before": b, "after": a})

    pb, pa = _params(gm_b), _params(gm_a)
    for target in list(pb) + [k for k in pa if k not in pb]:
        b, a = pb.get(target), pa.get(target)
        if b != a:
            change = "added" if b is None else "removed" if a is None else "changed"
            out.parameters.append({"change": change, "target": target, "layer": layer_from_path(target), "before": b, "after": a})
    return out
