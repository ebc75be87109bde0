"""Capture: one graphwright attention node per layer, MoE nodes, explicit state, clear errors."""

import pytest
import torch

import graphwright as gw
from graphwright.capture.ops import ATTENTION, MOE_EXPERTS
from graphwright.models import TINY_MODELS

MOE = {"tiny-mixtral", "tiny-phimoe", "tiny-qwen2moe"}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_one_attention_node_per_layer(name, compiled_tiny):
    cm = compiled_tiny(name)
    sg = cm.step_graph
    attn = sg.nodes(ATTENTION)
    assert len(attn) == sg.info.num_layers == 2
    assert sorted(n.meta["graphwright"]["layer"] for n in attn) == [0, 1]
    for n in attn:
        meta = n.meta["graphwright"]
        assert meta["variant"] == "dense" and meta["op"] == "attention"
        assert meta["module"].endswith(("self_attn", "attn")), meta["module"]
        assert "layers.%d" % meta["layer"] in meta["module"] or ".h.%d" % meta["layer"] in meta["module"]
    moe = sg.nodes(MOE_EXPERTS)
    assert len(moe) == (2 if name in MOE else 0)
    assert sg.info.is_moe == (name in MOE)
    sg.gm.graph.lint()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_state_is_explicit(name, compiled_tiny):
    sg = compiled_tiny(name).step_graph
    placeholders = [n.name for n in sg.gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[:3] == ["input_ids", "positions", "logits_index"]
    assert len(placeholders) == 3 + len(sg.state) == 3 + 1 + 2 * sg.info.num_layers
    assert [s.name for s in sg.state][:3] == ["key_positions", "k0", "v0"]
    out = next(n for n in sg.gm.graph.nodes if n.op == "output")
    assert len(out.args[0]) == 1 + len(sg.state)
    # no export leftovers on the hot path
    targets = {str(n.target) for n in sg.gm.graph.nodes}
    assert "aten._assert_tensor_metadata.default" not in targets and "_guards_fn" not in targets


def test_dynamic_batch_sequence_and_cache(compiled_tiny):
    sg = compiled_tiny("tiny-llama").step_graph
    for B, T, S in [(1, 1, 0), (4, 7, 0), (3, 1, 9), (1, 33, 5)]:
        state = sg.init_state(B)
        state[0] = torch.arange(S).expand(B, S).contiguous()
        for i in range(1, len(state)):
            state[i] = torch.randn(B, sg.info.num_kv_heads, S, sg.info.head_dim)
        pos = torch.arange(S, S + T).expand(B, T)
        logits, new = sg(torch.randint(3, 256, (B, T)), pos, torch.tensor([T - 1]), state)
        assert logits.shape == (B, 1, 256)
        assert new[0].shape == (B, S + T) and new[1].shape == (B, sg.info.num_kv_heads, S + T, sg.info.head_dim)


def test_capture_restores_model_config(tiny):
    m = tiny("tiny-llama")
    before = m.config._attn_implementation
    gw.capture(m)
    assert m.config._attn_implementation == before
    assert not any("_graphwright_path" in mod.__dict__ for mod in m.modules())


def test_non_hf_module_is_refused_by_name():
    with pytest.raises(gw.CaptureError, match="Linear has no .config"):
        gw.capture(torch.nn.Linear(4, 4))


def test_attention_outside_interface_names_the_layers(tiny):
    """A model whose attention bypasses transformers' interface cannot be captured silently."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)
    m = transformers.LlamaForCausalLM(cfg).eval()

    class OwnAttention(torch.nn.Module):  # computes something without the attention interface
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states, **kwargs):
            return self.inner.o_proj(self.inner.v_proj(hidden_states).repeat(1, 1, 1)[..., :32]), None

    m.model.layers[1].self_attn = OwnAttention(m.model.layers[1].self_attn)
    with pytest.raises(gw.CaptureError, match=r"layers \[1\] did not call transformers' attention interface"):
        gw.capture(m)


def test_failing_module_is_named():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    m = transformers.LlamaForCausalLM(cfg).eval()

    class Exploding(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python branch: not exportable
                return x
            return -x

    m.model.layers[0].mlp = Exploding()
    with pytest.raises(gw.CaptureError, match=r"module 'model\.layers\.0\.mlp' failed to export"):
        gw.capture(m)
