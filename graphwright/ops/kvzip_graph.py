"""KVzip's replay graph (arXiv 2505.23416): the step graph cut at each KVzip layer's attention inputs.

One definition for both sides: the torch runtime lowers it (``runtime/kvzip_replay.py``) and ONNX export writes
it as ``kvzip_replay.onnx`` (``codegen/onnx/kvzip_export.py``). Invariant tested there: its q/k/k_pos give the
scores of a loop oracle over Hugging Face's eager attention, and ORT's outputs equal the torch graph's.
"""

from __future__ import annotations

import torch

from ..errors import GraphwrightError
from . import schema
from .eviction import LATENT_KEYS
from .latent_attention import LATENT_ATTENTION


def replay_graph(gm: torch.fx.GraphModule, layers: list[int], head_dim: int | None = None):
    """(graph module, scales): a copy of ``gm`` returning (q, k, k_pos) of each listed layer's attention, in order.

    A latent layer (``graphwright.latent_attention``) returns its keys rebuilt per KV head from the latents by
    ``graphwright.latent_keys`` (fp32 [B, Hk, S, D], the keys the op attends to; ``head_dim`` needed) and its
    shared positions [B, S]."""
    graph = torch.fx.Graph()
    env = {}
    outs, scales, found = {}, {}, {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda x: env[x])
        if schema.is_attention(n) and schema.layer_of(n) in layers:
            found[schema.layer_of(n)] = n
    for layer in layers:
        n = found.get(layer)
        if n is None:
            raise GraphwrightError(f"kvzip: layer {layer} has no attention node in the step graph")
        scale = schema.get(n, "scale")
        if isinstance(scale, torch.fx.Node):
            raise GraphwrightError(f"kvzip: layer {layer}'s attention scale is computed in the graph; a constant is needed")
        scales[layer] = float(scale)
        if n.target is LATENT_ATTENTION:
            if head_dim is None:
                raise GraphwrightError(f"kvzip: layer {layer} is latent; its keys are rebuilt with head_dim, none given")
            values = {name: _mapped(env, schema.get(n, name)) for name in schema.arg_names(LATENT_KEYS)
                      if name in schema.arg_names(n.target)}
            keys = schema.call(graph, LATENT_KEYS, **values, head_dim=head_dim)
            outs[layer] = [env[schema.get(n, "q")], keys, env[schema.get(n, "k_pos")]]
        else:
            outs[layer] = [env[schema.get(n, name)] for name in ("q", "k", "k_pos")]
    graph.output(tuple(x for layer in layers for x in outs[layer]))
    graph.eliminate_dead_code()
    graph.lint()
    return torch.fx.GraphModule(gm, graph), scales


def _mapped(env: dict, value):
    return env[value] if isinstance(value, torch.fx.Node) else value
