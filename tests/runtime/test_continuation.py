"""score_continuation: a teacher-forced continuation in multi-token steps over the compressed cache equals one
decode step per token (score_stream) for graphs that only append after the prompt step; others are refused."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.eval.perplexity import long_perplexity
from graphwright.heads.headset import HeadSet
from graphwright.runtime.continuation import append_only_refusal, score_continuation
from graphwright.runtime.score import score_stream

T, PREFIX = 60, 24


def _ids(seed=0, rows=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (rows, T), generator=g)


def _shares_recipe(tmp_path, info, budget=8):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(info.num_layers, info.num_kv_heads, generator=g)
    s[s < 0.4] = 0.0
    hs = HeadSet(model="tiny", method="retrieval", scores=tuple(tuple(float(x) for x in r) for r in s), retrieval=frozenset())
    path = hs.save(tmp_path / "heads.json")
    return f'snapkv(budget={budget}, window=4, heads="scores", gamma=2.0, floor=0.0, headset="{path}")'


@pytest.mark.parametrize("kind", ["dense", "uniform", "shares"])
def test_block_scores_equal_decode_step_scores(tiny, tmp_path, kind):
    model = tiny("tiny-llama")
    recipe = {"dense": None, "uniform": "snapkv(budget=8, window=4)"}.get(kind)
    if kind == "shares":
        recipe = _shares_recipe(tmp_path, gw.compile(model).info)
    cm = gw.compile(model, recipe=recipe, verify=False)
    assert append_only_refusal(cm.runtime_graph) is None
    ids = _ids(seed=3, rows=2)
    want = score_stream(cm, ids, PREFIX)
    want_stats = dict(cm.last_stats)
    for block in (None, 5, 1):
        got = score_continuation(cm, ids, PREFIX, block=block)
        assert got.shape == want.shape == (2, T - 1)
        assert (got - want).abs().max() <= 1e-5, (kind, block)
        assert cm.last_stats["kv_bytes"] == want_stats["kv_bytes"]
        assert cm.last_stats["kv_bytes_dense"] == want_stats["kv_bytes_dense"]
        assert cm.last_stats["continuation_steps"] == {None: 1, 5: 7, 1: T - 1 - PREFIX}[block]
    if kind != "dense":  # the compression really happened: fewer bytes than dense at the end
        assert want_stats["kv_fraction"] < 1.0
        assert (want - score_stream(gw.compile(model), ids, PREFIX)).abs().max() > 1e-3


def test_long_perplexity_block_equals_decode_steps(tiny):
    cm = gw.compile(tiny("tiny-llama"), recipe="snapkv(budget=8, window=4)", verify=False)
    wins = [_ids(seed=s) for s in (5, 6)]
    a = long_perplexity(cm, wins, prefix=PREFIX, progress=False)
    b = long_perplexity(cm, wins, prefix=PREFIX, progress=False, block=16)
    assert max(abs(x - y) for x, y in zip(a["nll"], b["nll"])) <= 1e-6
    assert a["kv_bytes"] == b["kv_bytes"] and b["block"] == 16 and a["block"] is None
    with pytest.raises(ValueError, match="CompiledModel"):
        long_perplexity(tiny("tiny-llama"), wins, prefix=PREFIX, progress=False, block=16)


@pytest.mark.parametrize("recipe, says", [
    ("h2o(heavy=4, recent=4)", "evicts at decode steps"),
    ("streaming(sinks=2, window=6)", "evicts at decode steps"),
    ("evict(score='tova', budget=8)", "evicts at decode steps|when="),
    ("evict(score='knorm', budget=8, when='decode')", "when='decode'"),
    ("evict(score='keydiff', budget=8, block=8)", "block=8"),
])
def test_policies_that_evict_after_the_prompt_are_refused(tiny, recipe, says):
    cm = gw.compile(tiny("tiny-llama"), recipe=recipe, verify=False)
    assert append_only_refusal(cm.runtime_graph) is not None
    with pytest.raises(ValueError, match=says) as e:
        score_continuation(cm, _ids(), PREFIX)
    assert "score_stream" in str(e.value)


def test_prefill_scheduled_evict_is_allowed_and_bad_block_refused(tiny):
    cm = gw.compile(tiny("tiny-llama"), recipe="evict(score='knorm', budget=8, when='prefill')", verify=False)
    ids = _ids(seed=9)
    assert (score_continuation(cm, ids, PREFIX, block=7) - score_stream(cm, ids, PREFIX)).abs().max() <= 1e-5
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="block must be a positive int"):
            score_continuation(cm, ids, PREFIX, block=bad)
    with pytest.raises(TypeError, match="CompiledModel"):
        score_continuation(object(), ids, PREFIX)


@pytest.mark.parametrize("recipe", [
    "duo(retrieval=[[0, 0]], sinks=2, window=4)",  # layer 0 split, layer 1 all streaming
    "duo(retrieval=[[0, 0], [1, 1]], sinks=1, window=7)",  # both layers split
    "duo(retrieval=[[0, 0]], sinks=2, window=4) + snapkv(budget=8, window=4)",  # snapkv on the retrieval heads' prompt
])
def test_duo_streaming_heads_score_in_windowed_continuation_steps_as_in_decode_steps(tiny, recipe):
    """duo's streaming heads evict at every decode step; their attention masked to sinks + window + itself
    (runtime/duo_continuation.py) makes a multi-token continuation step equal to one decode step per token."""
    cm = gw.compile(tiny("tiny-llama"), recipe=recipe, verify=False)
    ids = _ids(seed=3, rows=2)
    want = score_stream(cm, ids, PREFIX)
    want_stats = dict(cm.last_stats)
    for block in (None, 5, 1):
        got = score_continuation(cm, ids, PREFIX, block=block)
        assert (got - want).abs().max() <= 1e-5, (recipe, block)
        assert cm.last_stats["kv_bytes"] == want_stats["kv_bytes"]
    assert want_stats["kv_fraction"] < 0.7  # the streaming heads really held sinks + window
    assert (want - score_stream(gw.compile(tiny("tiny-llama")), ids, PREFIX)).abs().max() > 1e-3


def test_duo_windowed_step_is_built_once_per_compiled_model(tiny, monkeypatch):
    """score_continuation lowers duo's windowed graph on the first call only; later calls (one per perplexity
    window) reuse it and give the same scores."""
    from graphwright.runtime import duo_continuation

    cm = gw.compile(tiny("tiny-llama"), recipe="duo(retrieval=[[0, 0]], sinks=2, window=4)", verify=False)
    builds = []
    build = duo_continuation._build_windowed_step
    monkeypatch.setattr(duo_continuation, "_build_windowed_step", lambda c: builds.append(c) or build(c))
    ids = _ids(seed=5)
    first = score_continuation(cm, ids, PREFIX, block=7)
    second = score_continuation(cm, ids, PREFIX, block=7)
    assert len(builds) == 1
    assert torch.equal(first, second)
    other = gw.compile(tiny("tiny-llama"), recipe="duo(retrieval=[[0, 0]], sinks=2, window=4)", verify=False)
    score_continuation(other, ids, PREFIX, block=7)
    assert len(builds) == 2  # a second compiled model builds its own


def test_duo_windowed_continuation_still_refuses_other_decode_evictions(tiny):
    model = tiny("tiny-llama")
    cm = gw.compile(model, recipe="duo(retrieval=[[0, 0]], sinks=2, window=4) + h2o(heavy=4, recent=4)", verify=False)
    with pytest.raises(ValueError, match="evict_h2o evicts at decode steps"):
        score_continuation(cm, _ids(), PREFIX)
    cm = gw.compile(model, recipe="lowrank_kv(keep=0.5) + duo(retrieval=[[0, 0]], sinks=2, window=4)", verify=False)
    with pytest.raises(ValueError, match="latent cache .*duo \\+ lowrank_kv"):
        score_continuation(cm, _ids(), PREFIX)
