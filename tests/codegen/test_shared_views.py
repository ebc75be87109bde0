"""codegen/torch/shared_views.py: identical unsqueeze/expand nodes merged, values unchanged."""

from __future__ import annotations

import dataclasses

import torch

from graphwright.codegen.backends import TORCH
from graphwright.codegen.torch.shared_views import share_views
from graphwright.compiled import CompiledModel
from graphwright.passes.base import PassContext
from graphwright.passes.h2o import H2O
from graphwright.passes.streaming import Streaming
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, state_of

UNSHARED = dataclasses.replace(TORCH, name="torch_unshared", transforms=tuple(t for t in TORCH.transforms if t is not share_views))


def test_only_identical_views_are_merged():
    g = torch.fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    a1 = g.call_function(torch.ops.aten.unsqueeze.default, (x, 1))
    a2 = g.call_function(torch.ops.aten.unsqueeze.default, (x, 1))
    b = g.call_function(torch.ops.aten.unsqueeze.default, (x, 0))  # another dim
    c = g.call_function(torch.ops.aten.unsqueeze.default, (y, 1))  # another input
    e1 = g.call_function(torch.ops.aten.expand.default, (a1, [-1, 3, -1]))
    e2 = g.call_function(torch.ops.aten.expand.default, (a2, [-1, 3, -1]))  # equal once a2 is a1
    e3 = g.call_function(torch.ops.aten.expand.default, (a2, [-1, 4, -1]))
    g.output((a1, a2, b, c, e1, e2, e3))
    share_views(g)
    out = next(n for n in g.nodes if n.op == "output").args[0]
    assert out[0] is out[1] and out[4] is out[5]
    assert len({id(n) for n in out}) == 5
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    r = gm(torch.arange(6).view(2, 3), torch.zeros(2, 3))
    assert r[4].shape == (2, 3, 3) and r[6].shape == (2, 4, 3) and r[2].shape == (1, 2, 3)


def test_eviction_layers_share_one_position_view_and_decode_the_same(compiled_tiny):
    for p in (H2O(heavy=3, recent=2), Streaming(sinks=2, window=5)):
        sg = p.run(compiled_tiny("tiny-llama").step_graph.copy(), PassContext())
        shared, plain = CompiledModel(sg, backend="torch"), CompiledModel(sg, backend=UNSHARED)
        assert shared.lowered_code().count("unsqueeze.default(positions, 1)") == 1
        assert plain.lowered_code().count("unsqueeze.default(positions, 1)") == 2  # one per layer
        ids, mask = left_padded_batch(256, [12, 7], seed=3)
        got, _, s1 = decode_loop(shared, ids, mask, 30)
        want, _, s2 = decode_loop(plain, ids, mask, 30)
        assert torch.equal(got, want)
        for layer in range(2):
            n = f"key_positions{layer}"
            assert kept_positions(state_of(shared, s1, n)) == kept_positions(state_of(plain, s2, n))
