"""Model folders are untrusted input: their code never runs and their config cannot ask for unbounded work.

A tokenizer_config.json with an ``auto_map`` to a ``.py`` file makes transformers ask "run the custom
code? [y/N]" unless ``trust_remote_code`` is pinned; the tests answer "y" to that prompt (as a user
might) and assert that no prompt came and the file never ran (it would write a marker file).
"""

import builtins
import json

import pytest

import graphwright as gw
from graphwright.models import tiny_model

EVIL = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n\nclass EvilTokenizer:\n    pass\n"


def plant_custom_tokenizer(folder, marker):
    """An auto_map to evil.py, which writes ``marker`` when imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))


@pytest.fixture
def answer_yes(monkeypatch):
    """Answer "y" to any input() prompt and record the prompts."""
    prompts = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", fake_input)
    return prompts


def test_folder_tokenizer_code_never_runs(tmp_path, answer_yes):
    folder = tmp_path / "model"
    tiny_model("tiny-llama").save_pretrained(folder)
    marker = tmp_path / "MARKER"
    plant_custom_tokenizer(folder, marker)
    with pytest.raises(gw.ModelLoadError, match=r"custom tokenizer code \(auto_map\).*never runs"):
        gw.load_model(folder)
    assert answer_yes == [] and not marker.exists()


def test_config_asking_for_100000_layers_is_refused(tmp_path):
    folder = tmp_path / "model"
    tiny_model("tiny-llama").save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100_000}))
    with pytest.raises(gw.ModelLoadError, match=r"num_hidden_layers must be an integer in \[1, 1024\]; got 100000"):
        gw.load_model(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 7}))
    with pytest.raises(gw.ModelLoadError, match=r"asks for 7 layers but the safetensors weights hold 2"):
        gw.load_model(folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(gw.ModelLoadError, match=r"config.json nests too deeply"):
        gw.load_model(folder)
