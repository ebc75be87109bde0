"""Keyformer and Scissorhands on SmolLM2-135M: streamed perplexity at 50% KV (slow; tiny sizes).

One 128-token window of the shipped novel, 64 tokens prefilled, 64 scored through decode steps
(``graphwright.eval`` perplexity, stream mode, so eviction acts). Keyformer kv=1.0 freezes k at the
64-token prompt and Scissorhands budget=64 attends to at most 64 tokens: 50% of the window's KV at
its end. The check is that eviction really ran (fewer KV bytes) and the perplexity stays within
25% of dense; the values are printed for the README (``-s``).
"""

import functools

import pytest

import graphwright as gw
from graphwright.eval.perplexity import perplexity

pytestmark = pytest.mark.slow

KW = dict(max_tokens=128, window=128, stride=64, mode="stream", prefix=64, progress=False)


@functools.lru_cache(maxsize=None)
def _smol():
    return gw.load_model("smollm2-135m")


@functools.lru_cache(maxsize=None)
def _dense_ppl():
    model, tok = _smol()
    return perplexity(gw.compile(model, tokenizer=tok), **KW)["ppl"]


@pytest.mark.parametrize("recipe", ["keyformer(kv=1.0)", "scissorhands(budget=64, recent=10)"])
def test_streamed_perplexity_at_half_kv(recipe):
    model, tok = _smol()
    cm = gw.compile(model, tokenizer=tok, recipe=recipe)
    got = perplexity(cm, **KW)
    dense = _dense_ppl()
    stats = cm.last_stats
    print(f"\n{recipe}: ppl {got['ppl']:.3f} vs dense {dense:.3f} ({100 * (got['ppl'] / dense - 1):+.2f}%), "
          f"kv_fraction {stats.get('kv_fraction')}")
    assert stats["kv_bytes"] < 0.55 * stats["kv_bytes_dense"]
    assert abs(got["ppl"] / dense - 1) < 0.25
