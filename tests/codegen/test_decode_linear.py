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
    assert (id(w) in dl._TRANSPOSED) == (rows <= dl.DECODE_ROWS)  # the copy is made by decode-sized calls only


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
