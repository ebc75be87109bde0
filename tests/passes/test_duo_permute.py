"""``passes/duo_permute.py``: duo's head split as a weight permutation (retrieval heads first) is exact.

The permuted graph against the gathered one (``duo_permute.ENABLED = False``, the ``index_select`` form):
logits of a left-padded prompt and of every decode step equal within fp32 rounding (1e-5), the same greedy
tokens; the split layers read no ``index_select``; the model's own weights are not touched. Tiny Llama
(no projection biases) and tiny Qwen2 (q/k/v biases), retrieval heads that are not already first.
"""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.passes import duo_permute
from graphwright.runtime.score import stream_logits
from tests.conftest import _tiny, left_padded_batch

aten = torch.ops.aten
GEN = dict(eos_token_id=[], pad_token_id=0)
RECIPE = "duo(retrieval=[[0, 1], [1, 1]], sinks=2, window=5)"  # KV head 1 retrieval, 0 streaming: the order flips


def _compile(name: str, permute: bool, monkeypatch):
    monkeypatch.setattr(duo_permute, "ENABLED", permute)
    return gw.compile(_tiny(name), recipe=RECIPE, verify=False)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_permuted_heads_equal_the_gathered_split(name, monkeypatch):
    model = _tiny(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perm, gath = _compile(name, True, monkeypatch), _compile(name, False, monkeypatch)
    fns = [str(n.target) for n in perm.step_graph.gm.graph.nodes if n.op == "call_function"]
    # 2 split layers: one split of q, k, v each, no gather
    assert "aten.index_select.default" not in fns and fns.count("aten.split_with_sizes.default") == 2 * 3
    assert "aten.index_select.default" in [str(n.target) for n in gath.step_graph.gm.graph.nodes if n.op == "call_function"]
    params = {n.target for n in perm.step_graph.gm.graph.nodes if n.op == "get_attr"}
    assert {f"gw_duo_l{i}_{p}_proj_weight" for i in (0, 1) for p in "qkvo"} <= params
    if name == "tiny-qwen2":
        assert {f"gw_duo_l{i}_{p}_proj_bias" for i in (0, 1) for p in "qkv"} <= params
    ids, mask = left_padded_batch(256, (60, 51), seed=5)
    real = mask.bool()
    lp, lg = perm.logits(ids, attention_mask=mask), gath.logits(ids, attention_mask=mask)
    assert lp.abs().max() > 1  # real logits
    assert (lp - lg)[real].abs().max().item() <= 1e-5
    # a 15-token prefill, then 45 teacher-forced decode steps (the streaming heads evict at every step)
    sp, state_p = stream_logits(perm._step, perm.runtime_graph.state, ids, mask, 15)
    sg_, state_g = stream_logits(gath._step, gath.runtime_graph.state, ids, mask, 15)
    assert (sp - sg_)[real].abs().max().item() <= 1e-5
    for spec, a, b in zip(perm.runtime_graph.state, state_p, state_g):  # caches in the same (retrieval, streaming) layout
        assert a.shape == b.shape and (a.float() - b.float()).abs().max().item() <= 1e-5, spec.name
    assert torch.equal(perm.generate(ids, attention_mask=mask, max_new_tokens=16, **GEN),
                       gath.generate(ids, attention_mask=mask, max_new_tokens=16, **GEN))
    for k, v in model.state_dict().items():  # the model's own weights are left as they were
        assert torch.equal(v, before[k]), k


def _trace(fn, *args):
    """``fn`` as an FX graph of the aten ops it calls (not decomposed), each node's ``meta["val"]`` a fake tensor."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = torch.fx.symbolic_trace(fn)
    FakeTensorProp(gm).propagate(*args)
    return gm.graph


@pytest.mark.parametrize("tail, ok", [
    # RoPE-like: cos/sin broadcast over heads; rotate-half along head_dim
    (lambda y, c, s: aten.add.Tensor(aten.mul.Tensor(y, c), 1.0), True),
    (lambda y, c, s: aten.cat.default([aten.neg.default(aten.slice.Tensor(y, 3, 2, 4)), aten.slice.Tensor(y, 3, 0, 2)], -1), True),
    (lambda y, c, s: aten.mul.Tensor(y, s), False),  # a per-head scale: heads not interchangeable
    (lambda y, c, s: aten.flip.default(y, [1]), False),  # an op that moves heads
    (lambda y, c, s: aten.cat.default([aten.slice.Tensor(y, 1, 1, 4), aten.slice.Tensor(y, 1, 0, 1)], 1), False),
])
def test_headwise_accepts_only_head_independent_paths(tail, ok):
    """``_headwise`` (what ``permute_layer`` requires before it permutes): the path from the projection to the
    attention input [B, H, T, D] treats heads alike; anything else keeps duo's gathers."""
    B, T, H, D, d = 2, 3, 4, 4, 8

    def f(x, w, c, s):
        y = aten.transpose.int(aten.view.default(aten.linear.default(x, w), [B, T, H, D]), 1, 2)
        return tail(y, c, s)

    graph = _trace(f, torch.randn(B, T, d), torch.randn(H * D, d), torch.randn(T, D), torch.randn(1, H, 1, 1))
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    lin = next(n for n in graph.nodes if n.target is aten.linear.default)
    assert duo_permute._headwise(lin, out, H, D) is ok
