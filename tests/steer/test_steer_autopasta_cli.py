"""AutoPASTA end to end on a tiny model, and the steering CLI (generate --emphasis, steer profile/eval)."""

from __future__ import annotations

import json

import pytest

import graphwright as gw
from graphwright.cli.main import main
from graphwright.steer.autopasta import autopasta, most_similar, split_sentences
from graphwright.steer.spans import encode_with_emphasis
from tests.conftest import _tiny
from tests.steer.helpers import toy_tokenizer

CONTEXT = ("Maria Rossi is a nurse. She grew up in a small town near the coast. "
           "The town library closes early on Sundays. Her favourite food is fresh bread with olive oil.")
QUESTION = "What is the job of Maria Rossi?"
PARAPHRASE = "the nurse is Maria, she was a nurse by job"  # not a context sentence, closest to the first one


@pytest.fixture(scope="module")
def steered():
    return gw.compile(_tiny("tiny-llama"), recipe="steer(heads='all')", tokenizer=toy_tokenizer())


class ParaphrasingModel:
    """Wraps a steered model: step 1 (no emphasis) replies with a paraphrase, the rest is the real model."""

    def __init__(self, cm):
        self.cm, self.step_graph, self.calls = cm, cm.step_graph, []

    def generate_text(self, prompt, emphasis=None, **kw):
        self.calls.append((prompt, emphasis))
        return PARAPHRASE if emphasis is None else self.cm.generate_text(prompt, emphasis=emphasis, **kw)


def test_autopasta_highlights_the_original_sentence_not_the_reply(steered):
    sentences = split_sentences(CONTEXT)
    assert len(sentences) == 4 and all(s in CONTEXT for s in sentences)
    stub = ParaphrasingModel(steered)
    res = autopasta(stub, CONTEXT, QUESTION, max_new_tokens=5)
    assert res["located"] == PARAPHRASE
    assert res["sentence"] == "Maria Rossi is a nurse." and res["chosen_index"] == 0
    assert res["sentence"] in sentences and res["sentence"] != PARAPHRASE
    assert 0 < res["similarity"] < 1
    (p1, e1), (p2, e2) = stub.calls
    assert e1 is None and QUESTION in p1 and "Which sentence" in p1
    assert e2 == ["Maria Rossi is a nurse."] and QUESTION in p2
    # the answer is the real model steered on that sentence
    assert res["answer"] == steered.generate_text(p2, emphasis=["Maria Rossi is a nurse."], max_new_tokens=5)


def test_autopasta_with_the_model_itself_and_errors(steered, compiled_tiny):
    res = autopasta(steered, CONTEXT, QUESTION, max_new_tokens=4)
    assert res["sentence"] in split_sentences(CONTEXT)
    assert isinstance(res["answer"], str) and isinstance(res["located"], str)
    assert most_similar("library closes on sundays", split_sentences(CONTEXT))[0] == 2
    with pytest.raises(ValueError, match="autopasta needs a steered model"):
        autopasta(compiled_tiny("tiny-llama"), CONTEXT, QUESTION)
    with pytest.raises(ValueError, match="the context has no sentences"):
        autopasta(steered, "   ", QUESTION)


@pytest.fixture
def cli_model(tiny, monkeypatch, tmp_path):
    """The CLI on tiny-llama with the toy tokenizer (built-in tiny models ship none)."""
    import graphwright.cli.cmd_generate as gen
    import graphwright.cli.cmd_steer as st

    monkeypatch.setenv("GRAPHWRIGHT_CACHE", str(tmp_path / "cache"))
    loaded = lambda args: (tiny(args.model), toy_tokenizer())  # noqa: E731
    monkeypatch.setattr(gen, "load", loaded)
    monkeypatch.setattr(st, "load", loaded)


def test_cli_generate_emphasis_marked_and_substring(cli_model, tiny, tmp_path):
    plain = "Maria Rossi is a nurse. Answer the occupation of Maria Rossi."
    marked = "Maria Rossi is a nurse. **Answer the occupation** of Maria Rossi."
    base = ["generate", "--model", "tiny-llama", "--recipe", "steer(heads={1: [0, 2]})", "--max-new-tokens", "5"]
    assert main([*base, "--json", str(tmp_path / "m.json"), marked, "--emphasis"]) == 0
    assert main([*base, "--json", str(tmp_path / "s.json"), plain, "--emphasis", "Answer the occupation"]) == 0
    m, s = (json.loads((tmp_path / f).read_text()) for f in ("m.json", "s.json"))
    assert m["prompt"] == plain == s["prompt"]
    _, _, spans = encode_with_emphasis(toy_tokenizer(), plain, ["Answer the occupation"])
    assert m["emphasis"] == s["emphasis"] == [[list(sp) for sp in spans[0]]]
    cm = gw.compile(tiny("tiny-llama"), recipe="steer(heads={1: [0, 2]})", tokenizer=toy_tokenizer())
    assert m["text"] == s["text"] == cm.generate_text(plain, emphasis=["Answer the occupation"], max_new_tokens=5)


def test_cli_generate_emphasis_errors(cli_model, capsys):
    base = ["generate", "--model", "tiny-llama", "--max-new-tokens", "2"]
    assert main([*base, "--recipe", "steer(heads='all')", "a **b c", "--emphasis"]) == 2
    assert "unbalanced ** markers" in capsys.readouterr().err
    assert main([*base, "--recipe", "steer(heads='all')", "a b c", "--emphasis", "zzz"]) == 2
    assert "emphasis substring 'zzz' does not occur in the prompt" in capsys.readouterr().err
    assert main([*base, "a **b** c", "--emphasis"]) == 2
    assert "emphasis needs a steered model" in capsys.readouterr().err


def test_cli_steer_profile_then_eval_with_a_user_task(cli_model, tmp_path, capsys):
    heads = tmp_path / "heads.json"
    assert main(["steer", "profile", "--model", "tiny-llama", "--task", "json", "--examples", "2", "--max-new-tokens", "3",
                 "--mode", "layers", "--top-layers", "1", "--out", str(heads)]) == 0
    prof = json.loads(heads.read_text())
    assert len(prof["heads"]) == 1 and list(prof["heads"].values()) == [[0, 1, 2, 3]]
    assert set(prof["scores"]["layers"]) == {"0", "1"} and prof["settings"]["examples"] == 2
    assert "head set for json" in capsys.readouterr().out

    out = tmp_path / "eval"
    assert main(["steer", "eval", "--model", "tiny-llama", "--task", "tests.steer.test_steer_heads:user_splits",
                 "--heads", str(heads), "--examples", "3", "--max-new-tokens", "3", "--all", "--out", str(out)]) == 0
    res = json.loads((out / "steer_eval_vowels.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["unsteered", f"heads={heads}", "random (same size)", "all heads"]
    assert [r["heads"] for r in rows.values()] == [0, 4, 4, 8]
    assert all(r["examples"] == 3 and 0 <= r["vowel_frac"] <= 1 for r in rows.values())
    assert main(["steer", "eval", "--model", "tiny-llama", "--task", "nosuch.module:fn", "--examples", "1"]) == 2
    assert "cannot import fn from nosuch.module" in capsys.readouterr().err
