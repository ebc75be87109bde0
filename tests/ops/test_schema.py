"""ops/schema.py: attention-op arguments by name, whether positional, keyword or defaulted."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops import schema
from graphwright.ops.block_sparse import BLOCK_SPARSE_ATTENTION
from graphwright.ops.latent_attention import LATENT_ATTENTION

ATTENTION = schema.ATTENTION

# per op: required arguments that are graph inputs, required scalars, and one defaulted argument
REQUIRED_SCALARS = {
    ATTENTION: {"scale": 0.5},
    LATENT_ATTENTION: {"rope_scaling": 1.0, "scale": 0.5, "k_bias": None, "v_up": None, "v_bias": None, "inv_freq": None},
    BLOCK_SPARSE_ATTENTION: {"scale": 0.5, "block": 4, "top_k": 2, "mode": "exact"},
}
DEFAULTED = {ATTENTION: ("window", 0, 8), LATENT_ATTENTION: ("sinks", 0, 2), BLOCK_SPARSE_ATTENTION: ("prefill", False, True)}


def _node(target):
    """``target`` called with its required tensors positional (placeholders) and scalars as given."""
    g = torch.fx.Graph()
    values = dict(REQUIRED_SCALARS[target])
    for a in target._schema.arguments:
        if not a.has_default_value() and a.name not in values:
            values[a.name] = g.placeholder(a.name)
    node = schema.call(g, target, **values)
    return g, node, values


@pytest.mark.parametrize("target", [ATTENTION, LATENT_ATTENTION, BLOCK_SPARSE_ATTENTION], ids=lambda t: str(t))
def test_get_after_set_positional_keyword_and_default(target):
    g, node, values = _node(target)
    required = [a.name for a in target._schema.arguments if not a.has_default_value()]
    # schema.call: required arguments positional in declaration order, nothing else
    assert len(node.args) == len(required) and not node.kwargs
    assert [schema.get(node, n) for n in required] == [values[n] for n in required]
    # positional: set in place
    x = g.placeholder("other")
    schema.set(node, required[0], x)
    assert node.args[0] is x and schema.get(node, required[0]) is x
    schema.set(node, "scale", 0.25)
    assert schema.get(node, "scale") == 0.25 and len(node.args) == len(required)
    # defaulted: the op's default until set, then a keyword
    name, default, value = DEFAULTED[target]
    assert schema.get(node, name) == default
    schema.set(node, name, value)
    assert node.kwargs == {name: value} and schema.get(node, name) == value
    schema.set(node, name, default)  # keyword: set again
    assert schema.get(node, name) == default
    assert schema.bound(node)[name] == default and set(schema.bound(node)) == set(schema.arg_names(target))


def test_call_puts_given_defaults_in_keywords():
    g = torch.fx.Graph()
    q, k, v, qp, kp = (g.placeholder(n) for n in ("q", "k", "v", "qp", "kp"))
    node = schema.call(g, ATTENTION, q=q, k=k, v=v, q_pos=qp, k_pos=kp, scale=0.5, sinks=2)
    assert node.args == (q, k, v, qp, kp, 0.5) and node.kwargs == {"sinks": 2}
    assert schema.get(node, "sinks") == 2 and schema.get(node, "window") == 0 and schema.get(node, "key_bias") is None


def test_unknown_or_missing_names_raise_key_error_naming_the_valid_ones():
    g, node, _ = _node(ATTENTION)
    for bad in (lambda: schema.get(node, "windw"), lambda: schema.set(node, "windw", 1)):
        with pytest.raises(KeyError, match=r"no argument 'windw'; its arguments: q, k, v, q_pos, k_pos, scale, window"):
            bad()
    assert schema.get(node, "windw", "fallback") == "fallback"
    with pytest.raises(KeyError, match=r"no argument 'top_k'; its arguments: q, k, v"):
        schema.call(g, ATTENTION, top_k=3)
    with pytest.raises(KeyError, match="required argument 'q' not given"):
        schema.call(g, ATTENTION, scale=1.0)
    assert schema.has_arg(LATENT_ATTENTION, "k_norm") and not schema.has_arg(BLOCK_SPARSE_ATTENTION, "key_bias")


def test_a_node_edited_by_name_still_runs():
    """window set by name (a keyword) changes the output exactly as calling the op with window=."""
    g = torch.fx.Graph()
    q, k, v, qp, kp = (g.placeholder(n) for n in ("q", "k", "v", "qp", "kp"))
    node = schema.call(g, ATTENTION, q=q, k=k, v=v, q_pos=qp, k_pos=kp, scale=0.5)
    g.output(node)
    torch.manual_seed(0)
    B, H, T, D = 1, 2, 6, 4
    args = (torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D),
            torch.arange(T)[None], torch.arange(T)[None])
    dense = torch.fx.GraphModule(torch.nn.Module(), g)(*args)
    schema.set(node, "window", 2)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    got = gm(*args)
    want = ATTENTION(*args, 0.5, window=2)
    assert torch.equal(got, want) and not torch.allclose(got, dense)
