"""``graphwright generate --context FILE --question ...``: one compression, several answers, a saved context."""

from __future__ import annotations

import json

import pytest

from graphwright.cli.main import main


@pytest.mark.parametrize("argv, message", [
    (["generate"], "give a prompt, or --context FILE with --question TEXT"),
    (["generate", "hi", "--question", "q"], "--question and --save-context need --context FILE"),
    (["generate", "hi", "--context", "CTX"], "give either a prompt or --context with --question, not both"),
    (["generate", "--context", "CTX"], "--context needs at least one --question"),
    (["generate", "--context", "CTX", "--question", "q", "--emphasis", "x"], "--emphasis cannot be combined with --context"),
])
def test_context_argument_errors_are_one_line(tmp_path, capsys, argv, message):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("some context")
    argv = [str(ctx) if a == "CTX" else a for a in argv]
    assert main([*argv, "--model", "tiny-llama"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_smollm2_answers_two_questions_from_one_compressed_context(tmp_path, capsys):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Anna keeps the spare key under the blue flower pot. The bakery opens at seven. "
                   "Tom's dog is called Biscuit and it loves the park by the river. " * 3)
    saved, out = tmp_path / "ctx.safetensors", tmp_path / "a.json"
    argv = ["generate", "--model", "smollm2-135m", "--recipe", "snapkv(budget=48, window=16)", "--context", str(ctx),
            "--question", "What is the dog called?", "--question", "Where is the spare key?", "--max-new-tokens", "12",
            "--save-context", str(saved), "--json", str(out)]
    assert main(argv) == 0
    first = json.loads(out.read_text())["answers"]
    assert [a["stats"]["context_tokens"] for a in first] == [first[0]["stats"]["context_tokens"]] * 2
    assert "Biscuit" in first[0]["text"]
    assert saved.is_file()
    # the saved context answers the same without the text
    again = tmp_path / "b.json"
    assert main(["generate", "--model", "smollm2-135m", "--recipe", "snapkv(budget=48, window=16)", "--context", str(saved),
                 "--question", "What is the dog called?", "--max-new-tokens", "12", "--json", str(again)]) == 0
    assert json.loads(again.read_text())["answers"][0]["text"] == first[0]["text"]
