"""``gw.inspect.to_networkx(graph)``: the step graph as an ``nx.DiGraph`` for analysis.

FX graphs are awkward to query (paths, dominators, per-layer subgraphs, export to GraphML or
Gephi); networkx does all of that. Each FX node becomes one nx node keyed by its name with
plain attributes, and each data dependency one edge from input to user.
"""

from __future__ import annotations

import networkx as nx

from .nodes import gw_meta, is_graphwright, layer_map, module_path, node_dtype, node_shapes, target_name, unwrap


def to_networkx(graph) -> nx.DiGraph:
    """One nx node per FX node (``op``, ``target``, ``shapes``, ``dtype``, ``layer``, ``variant``,
    ``module``, ``graphwright``); edges input -> user. ``graph``: GraphModule, StepGraph or CompiledModel."""
    gm, sg = unwrap(graph)
    layers = layer_map(graph)
    g = nx.DiGraph()
    if sg is not None:
        g.graph.update(architecture=sg.info.architecture, num_layers=sg.info.num_layers)
    for order, node in enumerate(gm.graph.nodes):
        meta = gw_meta(node)
        g.add_node(node.name, op=node.op, target=target_name(node), shapes=node_shapes(node), dtype=node_dtype(node),
                   layer=layers[node], variant=meta.get("variant"), module=module_path(node),
                   graphwright=is_graphwright(node), order=order)
    for node in gm.graph.nodes:
        for user in node.users:
            g.add_edge(node.name, user.name)
    return g
