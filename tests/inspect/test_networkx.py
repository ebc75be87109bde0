"""gw.inspect.to_networkx: one nx node per FX node with shapes/layer/variant, edges = FX users."""

from __future__ import annotations

import graphwright.inspect as gi


def test_nodes_edges_and_attributes(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    g = gi.to_networkx(cm.graph)
    fx_nodes = list(cm.graph.graph.nodes)
    assert g.number_of_nodes() == len(fx_nodes)
    assert set(g.edges) == {(n.name, u.name) for n in fx_nodes for u in n.users}
    for _name, attrs in g.nodes(data=True):
        assert set(attrs) >= {"op", "target", "shapes", "dtype", "layer", "variant", "module"}
    attn = [(n, a) for n, a in g.nodes(data=True) if a["target"] == "graphwright.attention.default"]
    assert sorted(a["layer"] for _, a in attn) == [0, 1]
    for _, a in attn:
        assert a["variant"] == "dense" and a["graphwright"]
        assert a["module"] == f"model.layers.{a['layer']}.self_attn"
        assert len(a["shapes"]) == 1 and len(a["shapes"][0]) == 4 and a["dtype"] == "float32"
    # parameters and per-layer nodes carry their layer; embeddings are model-level
    assert g.nodes["hf_model_layers_1_self_attn_q_proj_weight"]["layer"] == 1
    assert g.nodes["hf_model_embed_tokens_weight"]["layer"] is None


def test_step_graph_and_compiled_model_inputs(compiled_tiny):
    cm = compiled_tiny("tiny-mixtral")
    g = gi.to_networkx(cm)
    assert g.graph["architecture"] == "MixtralForCausalLM"
    assert g.number_of_nodes() == gi.to_networkx(cm.step_graph).number_of_nodes()
    # with a state layout, cache placeholders belong to their layer
    layers = {a["layer"] for n, a in g.nodes(data=True) if a["op"] == "placeholder" and n.startswith("cache_")}
    assert layers == {0, 1}
    moe = [a for _, a in g.nodes(data=True) if a["target"] == "graphwright.moe_experts.default"]
    assert sorted(a["layer"] for a in moe) == [0, 1] and {a["variant"] for a in moe} == {"loop"}
