"""Needle in a haystack: seeded grids, token-exact needle depth, exact-match scoring."""

import copy
import functools

import pytest
import torch

from graphwright.errors import ModelLoadError
from graphwright.eval.niah import is_correct, needle_grid, run_niah


@functools.lru_cache(maxsize=None)
def _smol_tokenizer():
    from transformers import AutoTokenizer

    from graphwright.models.smollm2 import converted_folder

    return AutoTokenizer.from_pretrained(converted_folder())


@pytest.fixture(params=["chat", "plain"])
def tok(request):
    try:
        t = _smol_tokenizer()
    except ModelLoadError as e:
        pytest.fail(f"the built-in tokenizer must load: {e}")
    if request.param == "plain":  # a tokenizer without a chat template takes the plain prompt path
        t = copy.deepcopy(t)
        t.chat_template = None
    return t


def test_grid_is_deterministic_per_seed(tok):
    a = needle_grid(tok, lengths=[160], depths=[0.0, 0.5, 1.0], seed=0)
    assert a == needle_grid(tok, lengths=[160], depths=[0.0, 0.5, 1.0], seed=0)
    b = needle_grid(tok, lengths=[160], depths=[0.0, 0.5, 1.0], seed=1)
    assert [c["prompt"] for c in a] != [c["prompt"] for c in b]
    assert [c["id"] for c in a] == ["L160-d0-r0", "L160-d0.5-r0", "L160-d1-r0"]


def test_needle_sits_at_the_requested_depth(tok):
    cases = needle_grid(tok, lengths=[160, 300], depths=[0.0, 0.25, 0.5, 0.75, 1.0], seed=3)
    for c in cases:
        ids = tok(c["prompt"], add_special_tokens=c["prompt"].find("<|im_start|>") < 0).input_ids
        assert len(ids) == c["prompt_tokens"] and abs(c["prompt_tokens"] - c["length"]) <= 1
        start, end = c["context_span"]
        filler = end - start - c["needle_tokens"]
        assert abs((c["needle_token"] - start) - c["depth"] * filler) <= 2, c["id"]
        needle = tok.decode(ids[c["needle_token"]:c["needle_token"] + c["needle_tokens"]]).strip()
        assert needle == f"The best thing to do in {c['city']} is {c['activity']}."
        assert c["prompt"].count(c["city"]) == 3  # needle, question, answer primer


def test_exact_match_scoring():
    assert is_correct(" to Feed the ducks at  the old mill.", "feed the ducks at the old mill")
    assert not is_correct(" feed the ducks at the mill.", "feed the ducks at the old mill")
    assert not is_correct("", "feed the ducks at the old mill")


class _Oracle:
    """A stand-in model that answers with a fixed text (the cm path of run_niah)."""

    def __init__(self, tok, answer):
        self.tok, self.answer = tok, answer

    def generate(self, ids, max_new_tokens, **kw):
        text = self.answer(self.tok.decode(ids[0]))
        new = torch.tensor([self.tok(text, add_special_tokens=False).input_ids[:max_new_tokens]])
        return torch.cat([ids, new], dim=1)


def test_run_niah_accuracy_per_length_and_depth():
    try:
        tok = _smol_tokenizer()  # the chat tokenizer; the plain path is covered by the grid tests
    except ModelLoadError as e:
        pytest.fail(f"the built-in tokenizer must load: {e}")
    cases = needle_grid(tok, lengths=[128, 160], depths=[0.0, 1.0], seed=0)
    by_prompt = {c["prompt"]: c for c in cases}
    right = lambda p: " " + by_prompt[p]["activity"] + "."  # noqa: E731
    shallow = lambda p: right(p) if by_prompt[p]["depth"] == 0.0 else " nothing."  # noqa: E731
    r = run_niah(_Oracle(tok, right), tok, cases, progress=False)
    assert r["accuracy"] == 1.0 and all(c["correct"] for c in r["cases"])
    r = run_niah(_Oracle(tok, shallow), tok, cases, progress=False)
    assert r["accuracy"] == 0.5
    assert r["by_depth"] == [{"depth": 0.0, "accuracy": 1.0, "n": 2}, {"depth": 1.0, "accuracy": 0.0, "n": 2}]
    assert r["by_length"] == [{"length": 128, "accuracy": 0.5, "n": 2}, {"length": 160, "accuracy": 0.5, "n": 2}]
    assert len(r["grid"]) == 4 and {"answer", "correct", "prompt_tokens"} <= set(r["cases"][0])


@pytest.mark.slow
def test_smollm2_base_and_identity_compiled_have_equal_accuracy():
    import graphwright as gw
    from graphwright.eval.niah import compare_niah

    model, tok = gw.load_model("smollm2-135m")
    cm = gw.compile(model, tokenizer=tok)
    cases = needle_grid(tok, lengths=[256, 512], depths=[0.0, 1.0], seed=0)
    r = compare_niah(model, cm, tok, cases, progress=False)
    assert len(r["base"]["cases"]) == 4
    assert r["base"]["accuracy"] == r["compiled"]["accuracy"] and r["agreement"] == 1.0
    assert r["base"]["accuracy"] >= 0.5  # the model does find most needles at these lengths
