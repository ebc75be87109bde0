"""Perplexity: base and identity-compiled models score the same, window and stream modes agree."""

import math

import pytest
import torch

from graphwright.eval.data import default_text_path, read_text
from graphwright.eval.perplexity import compare_perplexity, perplexity, windows
from graphwright.runtime.score import score_stream, token_nll

KW = dict(window=48, stride=16, progress=False)


def _ids(n=120, seed=0):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_windows_score_every_token_but_the_first_once():
    for n, w, s in [(120, 48, 16), (10, 48, 16), (2, 2, 1), (97, 40, 7)]:
        wins = windows(n, w, s)
        assert sum(k for *_, k in wins) == n - 1
        assert wins[-1][1] == n and all(e - b <= w for b, e, _ in wins)
        scored = [t for b, e, k in wins for t in range(e - k, e)]  # target positions each window scores
        assert scored == list(range(1, n))


def test_windows_never_claim_a_token_without_context():
    """stride == window: a window's first token has no context in it, so it is not counted as scored."""
    wins = windows(100, 32, 32)
    assert wins == [(0, 32, 31), (32, 64, 31), (64, 96, 31), (96, 100, 3)]
    assert all(k <= e - b - 1 for b, e, k in wins)


def test_stride_equal_to_window_averages_what_it_scores(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids = _ids(100, seed=3)
    r = perplexity(cm, input_ids=ids, window=32, stride=32, progress=False)
    nll = torch.cat([token_nll(cm.logits(ids[:, b:e])[:, :-1], ids[:, b + 1:e]) for b, e in ((0, 32), (32, 64), (64, 96), (96, 100))], 1)
    assert r["tokens"] == nll.shape[1] == 96
    assert math.isclose(r["nll"], float(nll.double().mean()), rel_tol=1e-5)


def test_base_and_identity_compiled_agree(tiny, compiled_tiny):
    r = compare_perplexity(tiny("tiny-llama"), compiled_tiny("tiny-llama"), input_ids=_ids(), **KW)
    assert r["base"]["tokens"] == r["compiled"]["tokens"] == 119
    assert _rel(r["compiled"]["ppl"], r["base"]["ppl"]) < 1e-4
    assert abs(r["ratio"] - 1) < 1e-4 and abs(r["delta"]) < 1e-4 * r["base"]["ppl"]
    assert math.isclose(r["base"]["ppl"], math.exp(r["base"]["nll"]))
    assert set(r["base"]) == {"ppl", "nll", "tokens", "window", "stride", "mode", "prefix", "seconds"}


def test_window_and_stream_agree_for_identity(tiny, compiled_tiny):
    ids = _ids(seed=1)
    cm = compiled_tiny("tiny-llama")
    window = perplexity(cm, input_ids=ids, mode="window", **KW)
    stream = perplexity(cm, input_ids=ids, mode="stream", **KW)
    hf_stream = perplexity(tiny("tiny-llama"), input_ids=ids, mode="stream", prefix=8, **KW)
    assert stream["prefix"] == 32 and stream["tokens"] == window["tokens"]
    assert _rel(stream["ppl"], window["ppl"]) < 1e-4
    assert _rel(hf_stream["ppl"], window["ppl"]) < 1e-4


def test_score_stream_equals_nll_from_full_logits(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ids = _ids(40, seed=2)
    full = token_nll(cm.logits(ids)[:, :-1], ids[:, 1:])
    for prefix in (1, 7, 40):
        nll = score_stream(cm, ids, prefix)
        assert nll.shape == (1, 39) and not nll.requires_grad  # scored without autograd (no graph kept per step)
        torch.testing.assert_close(nll, full, rtol=1e-4, atol=1e-4)
    assert score_stream(cm._runtime, ids[0], 5).shape == (39,)


def test_bad_arguments(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    with pytest.raises(ValueError, match="mode must be"):
        perplexity(cm, input_ids=_ids(), mode="fast")
    with pytest.raises(ValueError, match="stride must be"):
        perplexity(cm, input_ids=_ids(), window=16, stride=32)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(cm, text="no tokenizer for tiny models")
    with pytest.raises(ValueError, match="prefix_len"):
        score_stream(cm, _ids(10), 0)


def test_default_text_ships_with_the_package(tmp_path):
    path = default_text_path()
    assert path.is_file() and path.name == "northangerabbey.txt"
    assert read_text().startswith("NORTHANGER ABBEY")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_text(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(bad)


@pytest.mark.slow
def test_smollm2_identity_perplexity_on_the_novel():
    import graphwright as gw

    model, tok = gw.load_model("smollm2-135m")
    cm = gw.compile(model, tokenizer=tok)
    r = compare_perplexity(model, cm, max_tokens=512, window=256, stride=128, progress=False)
    assert r["base"]["tokens"] == 511
    assert 2 < r["base"]["ppl"] < 100  # a trained model on English prose
    assert _rel(r["compiled"]["ppl"], r["base"]["ppl"]) < 1e-4
