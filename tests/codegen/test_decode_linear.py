"""Decode GEMV on [in, out] weight copies and flat weight attributes (codegen/torch/decode_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphwright.codegen.backends import get_backend
from graphwright.codegen.lower import lower
from graphwright.codegen.torch import decode_linear as dl
from graphwright.compiled import CompiledModel
from tests.conftest import left_padded_batch


@pytest.mark.parametrize("rows", [1, 2, 3, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_rows_equals_linear(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.nn.Parameter(torch.randn(48, 32, generator=g))
    b = torch.randn(48, generator=g) if with_bias else None
    x = torch.randn(1, rows, 32, generator=g)
    with torch.inference_mode():
        got = dl.linear_rows(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert (id(w) in dl._TRANSPOSED) == (rows <= dl.DECODE_ROWS)  # 48 rows do not split: decode-sized calls copy


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("out_features", [192, 200, 1000])  # 200 at 3 threads: 2 blocks; 1000: 2 blocks at 3 threads
@pytest.mark.parametrize("rows", [1, 2])
def test_decode_rows_split_over_threads_equal_linear_without_a_weight_copy(threads, out_features, rows):
    """At >= 2 threads a decode GEMV is a bmm over blocks of output rows of the [out, in] weight (a view, no copy)."""
    g = torch.Generator().manual_seed(out_features + rows)
    w = torch.randn(out_features, 24, generator=g)
    b = torch.randn(out_features, generator=g)
    x = torch.randn(rows, 1, 24, generator=g)  # batch of `rows` sequences, one token each
    parts = dl.split_parts(out_features, threads)
    assert parts == {(1, 192): 1, (2, 192): 2, (3, 192): 3, (1, 200): 1, (2, 200): 2, (3, 200): 2,
                     (1, 1000): 1, (2, 1000): 2, (3, 1000): 2}[(threads, out_features)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = dl.linear_rows(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (rows, 1, out_features)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert (id(w) in dl._TRANSPOSED) == (parts == 1)  # the split reads the weight in place


def test_split_parts_keeps_blocks_of_at_least_min_part_rows():
    assert dl.split_parts(127, 16) == 1  # 127 is prime
    assert dl.split_parts(128, 16) == 2  # two blocks of 64
    assert dl.split_parts(49152, 16) == 16 and dl.split_parts(576, 16) == 9  # 9 blocks of 64
    assert dl.split_parts(1536, 0) == 1


def test_transposed_copy_is_shared_refreshed_after_writes_and_dropped_with_the_weight():
    w = torch.nn.Parameter(torch.randn(8, 4))
    a = dl.transposed(w)
    assert dl.transposed(w) is a and torch.equal(a, w.detach().t())
    with torch.no_grad():
        w.mul_(2)  # an in-place write bumps the version: the copy is made again
    assert torch.equal(dl.transposed(w), w.detach().t())
    key = id(w)
    del w
    assert key not in dl._TRANSPOSED


def _step(fn, ids, mask, specs, steps):
    """Prefill then greedy decode through a lowered step; returns every step's logits."""
    B, T = ids.shape
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
    state = [s.empty(B, ids.device) for s in specs]
    outs = []
    with torch.inference_mode():
        logits, *state = fn(ids, pos, torch.tensor([T - 1]), *state)
        nxt_pos = pos[:, -1:] + 1
        for _ in range(steps):
            outs.append(logits[:, -1].clone())
            tok = logits[:, -1].argmax(-1, keepdim=True)
            logits, *state = fn(tok, nxt_pos, torch.zeros(1, dtype=torch.long), *state)
            nxt_pos = nxt_pos + 1
    return torch.stack(outs)


@pytest.mark.parametrize("recipe", [None, "h2o(heavy=4, recent=4)"])
def test_lowered_step_with_the_rewrites_matches_it_without(tiny, recipe):
    import graphwright as gw

    cm = gw.compile(tiny("tiny-llama"), recipe=recipe)
    graph = cm.runtime_graph
    fast = lower(graph.gm, "torch")
    code = fast.code
    assert "linear_rows" in code and "aten.linear.default" not in code and "getattr(self.hf" not in code
    plain = lower(graph.gm, get_backend("torch").__class__(**{**get_backend("torch").__dict__, "finalize": None}))
    ids, mask = left_padded_batch(cm.info.vocab_size, [7, 4], seed=3)
    got = _step(fast, ids, mask, graph.state, 12)
    want = _step(plain, ids, mask, graph.state, 12)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shared_setting_lowers_without_the_copies(tiny, monkeypatch):
    monkeypatch.setenv("GRAPHWRIGHT_DECODE_WEIGHTS", "shared")
    cm = CompiledModel(__import__("graphwright").compile(tiny("tiny-llama")).step_graph, backend="torch")
    assert "linear_rows" not in cm.lowered_code() and "aten.linear.default" in cm.lowered_code()
