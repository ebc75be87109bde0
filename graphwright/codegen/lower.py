"""Lower a step graph's graphwright ops to a backend's implementations.

``cm.graph`` keeps the graphwright ops (what passes, inspection and export read). The runtime
runs a lowered copy whose op nodes call the backend's functions directly. Backends are objects
in one registry (``codegen/backends.py``): an op table, graph transforms and hooks, so adding
one is ``register_backend(Backend(...))``, not a new pipeline.
"""

from __future__ import annotations

import copy

import torch

from .backends import Backend, get_backend


def lower(gm: torch.fx.GraphModule, backend: str | Backend = "torch") -> torch.fx.GraphModule:
    """A copy of ``gm`` whose graphwright op nodes call ``backend``'s implementations.

    ``backend``: a registered name or a ``Backend``. Its transforms run first (on the copy),
    then every op its table names is swapped for the implementation, then ``finalize``.
    """
    b = get_backend(backend)
    graph = copy.deepcopy(gm.graph)
    for transform in b.transforms:
        transform(graph)
    for node in graph.nodes:
        impl = b.impl_for(node)
        if impl is not None:
            node.target = impl
    out = torch.fx.GraphModule(gm, graph)
    out.recompile()
    return b.finalize(out) if b.finalize is not None else out
