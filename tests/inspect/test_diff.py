"""gw.inspect.diff: structural node/state/parameter changes, grouped by layer."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

import graphwright.inspect as gi


def _attention_nodes(sg):
    return [n for n in sg.gm.graph.nodes if (n.meta.get("graphwright") or {}).get("op") == "attention"]


def test_identity_vs_identity_is_empty(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    for before, after in ((cm, cm), (cm.graph, cm.step_graph), (cm.step_graph, cm.step_graph.copy())):
        d = gi.diff(before, after)
        assert d.is_empty, str(d)
    assert "no changes" in str(gi.diff(cm, cm))
    assert gi.diff(cm, cm).to_dict()["is_empty"] is True


def test_edits_are_reported_under_their_layer(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    sg = cm.step_graph.copy()
    # layer 1: the attention node becomes another op with another variant
    attn = _attention_nodes(sg)[1]
    attn.target = torch.ops.aten.scaled_dot_product_attention.default
    attn.meta["graphwright"] = {**attn.meta["graphwright"], "variant": "sdpa"}
    # layer 0: a new node after the K projection
    k_proj = next(n for n in sg.gm.graph.nodes if "layers.0.self_attn.k_proj" in str((n.meta.get("nn_module_stack") or {})))
    with sg.gm.graph.inserting_after(k_proj):
        neg = sg.gm.graph.call_function(torch.ops.aten.neg.default, (k_proj,))
    neg.meta = {k: v for k, v in k_proj.meta.items()}
    # layer 1: a smaller K cache
    idx = next(i for i, s in enumerate(sg.state) if s.name == "k1")
    sg.state[idx] = replace(sg.state[idx], shape=(-1, cm.info.num_kv_heads, 0, 8))

    d = gi.diff(cm, sg)
    assert not d.is_empty
    layers = d.by_layer()
    assert set(layers) == {0, 1}
    assert [(c["change"], c["name"]) for c in layers[0]] == [("added", neg.name)]
    assert layers[0][0]["after"]["target"] == "aten.neg.default"
    (rep,) = layers[1]
    assert rep["change"] == "replaced" and rep["name"] == attn.name
    assert set(rep["why"]) == {"target", "variant"}
    assert rep["before"]["target"] == "graphwright.attention.default"
    assert rep["after"]["variant"] == "sdpa"
    (st,) = d.state
    assert st["name"] == "k1" and st["layer"] == 1 and st["change"] == "changed"
    assert st["before"]["bytes_per_token"] == 2 * st["after"]["bytes_per_token"]
    assert d.counts() == {"added": 1, "removed": 0, "replaced": 1, "state": 1, "parameters": 0}
    json.dumps(d.to_dict(), allow_nan=False)
    text = str(d)
    assert "aten.neg.default" in text and "k1" in text and "replaced" in text


def test_removed_node_and_new_parameter(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    sg = cm.step_graph.copy()
    g = sg.gm.graph
    # a pass adds a parameter (e.g. a steering vector) used by a new node in layer 1
    sg.gm.register_buffer("gw_steer_1", torch.zeros(cm.info.hidden_size))
    anchor = _attention_nodes(sg)[1]
    with g.inserting_before(anchor):
        p = g.get_attr("gw_steer_1")
    p.meta["graphwright"] = {"op": "steer", "layer": 1, "module": "model.layers.1", "variant": "steer"}
    # ... and a dead node in layer 0 goes away
    mul = next(n for n in g.nodes if n.target == torch.ops.aten.neg.default)
    users = list(mul.users)
    mul.replace_all_uses_with(mul.args[0])
    g.erase_node(mul)

    d = gi.diff(cm, sg)
    by = d.by_layer()
    assert any(c["change"] == "removed" and c["name"] == mul.name for c in by[0])
    assert any(c["change"] == "added" and c["name"] == p.name for c in by[1])
    rewired = {c["name"]: c["why"] for c in by[0] if c["change"] == "replaced"}
    assert all(rewired.get(u.name) == ["inputs"] for u in users), rewired
    (param,) = d.parameters
    assert param["change"] == "added" and param["target"] == "gw_steer_1"
    assert param["after"]["shape"] == [cm.info.hidden_size]


def test_diff_accepts_bare_graph_modules(compiled_tiny):
    gm = compiled_tiny("tiny-llama").graph
    assert gi.diff(gm, gm).is_empty
