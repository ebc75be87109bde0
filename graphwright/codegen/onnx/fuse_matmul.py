"""Sibling MatMul fusion: MatMuls that multiply one activation by constant weights become one MatMul and a Split.

Technique: horizontal (sibling) GEMM fusion, as in fused QKV projections (Megatron-LM, arXiv:1909.08053,
one ``[K, Nq + Nk + Nv]`` weight) and the fused gate/up projection of gated MLPs. A transformer layer
multiplies its normed hidden state by q, k and v (and later by gate and up) with separate weights; at a
decode step (one token) each is a matrix-vector product whose time is reading its weight once. ONNX
Runtime runs each MatMul as its own kernel with its own thread split and dispatch; 211 MatMuls per
SmolLM2-135M step become 121 here (q/k/v and gate/up per layer). ORT's own optimizer does not do this
on the CPU provider, and ``onnxruntime.transformers.optimizer`` only fuses its own contrib
``Attention``/``GroupQueryAttention`` patterns (exported from its own model builders), not the opset-23
graph the exporter writes, so it is done here on the ONNX IR after the exporter's optimizer.

Exact setting: the fused MatMul computes every output column from the same row and the same weight
column as before (the weights are concatenated along N, never changed); only the kernel's blocking
along N can differ, so logits agree with the unfused graph to float32 rounding (test: ``fuse=False``
vs fused on a tiny model, logits and greedy tokens; the artifact's verification checks it against torch).
Invariant: the Split's outputs have the old MatMuls' shapes, dtypes and consumers; a weight used
elsewhere too (a tied embedding) stays as well.
"""

from __future__ import annotations

MIN_GROUP = 2  # fuse when at least two MatMuls share the activation
MIN_OPSET = 13  # Split takes its sizes as an input from opset 13


def _const_2d(value):
    """The weight's constant tensor when ``value`` is a 2-D initializer, else None."""
    t = value.const_value if value is not None else None
    if t is None or not value.is_initializer() or value.is_graph_input() or len(t.shape) != 2:
        return None
    return t


def sibling_groups(graph) -> list:
    """[(activation, [MatMul nodes])]: MatMuls with activation input A and a 2-D constant weight of one dtype and K."""
    groups: dict = {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, w = node.inputs
        t = _const_2d(w)
        if a is None or t is None:
            continue
        groups.setdefault((id(a), t.dtype, t.shape[0]), (a, []))[1].append(node)
    return [(a, nodes) for a, nodes in groups.values() if len(nodes) >= MIN_GROUP]


def fuse_sibling_matmuls(model) -> int:
    """Fuse every sibling group of ``model``'s main graph in place; returns how many MatMuls were removed."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    removed = 0
    if model.opset_imports.get("", 0) < MIN_OPSET:
        return 0
    for a, nodes in sibling_groups(graph):
        weights = [n.inputs[1] for n in nodes]
        widths = [int(w.const_value.shape[1]) for w in weights]
        fused = np.concatenate([w.const_value.numpy() for w in weights], axis=1)
        first = nodes[0]
        name = f"{first.name}_fused{len(nodes)}"
        w_value = ir.Value(name=f"{name}_weight", shape=ir.Shape(fused.shape), type=ir.TensorType(weights[0].dtype),
                           const_value=ir.tensor(fused, dtype=weights[0].dtype, name=f"{name}_weight"))
        graph.register_initializer(w_value)
        split_sizes = ir.Value(name=f"{name}_split", shape=ir.Shape([len(widths)]), type=ir.TensorType(ir.DataType.INT64),
                               const_value=ir.tensor(np.array(widths, dtype=np.int64), name=f"{name}_split"))
        graph.register_initializer(split_sizes)
        matmul = ir.Node("", "MatMul", [a, w_value], name=name, num_outputs=1)
        matmul.outputs[0].name, matmul.outputs[0].type = f"{name}_out", weights[0].type
        if a.shape is not None:
            matmul.outputs[0].shape = ir.Shape([*a.shape[:-1], int(fused.shape[1])])
        split = ir.Node("", "Split", [matmul.outputs[0], split_sizes], attributes=[ir.AttrInt64("axis", -1)],
                        name=f"{name}_split", num_outputs=len(nodes))
        graph.insert_before(first, [matmul, split])
        for old, new in zip(nodes, split.outputs):
            out = old.outputs[0]
            name_out = out.name
            out.name = f"{name_out}_unfused"
            new.name, new.shape, new.type = name_out, out.shape, out.type
            for i, o in enumerate(graph.outputs):
                if o is out:  # a graph output keeps its name, now on the Split's output
                    graph.outputs[i] = new
            out.replace_all_uses_with(new)
        for old in nodes:
            graph.remove(old, safe=True)
        for w in weights:
            if not w.uses() and not w.is_graph_output() and w.name in graph.initializers:
                del graph.initializers[w.name]
        removed += len(nodes) - 1
    return removed
