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


def _gguf(path, block_count, blocks=2, hidden=64):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    w.add_embedding_length(hidden)
    w.add_context_length(64)
    for i in range(blocks):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("block_count, blocks, hidden, message", [
    (100_000, 2, 64, r"llama.block_count must be an integer in \[1, 1024\]; got 100000"),
    (40, 2, 64, r"llama.block_count asks for 40 layers but the file's tensors hold 2"),
    (2, 2, 1 << 20, r"llama.embedding_length must be an integer in \[1, 65536\]; got 1048576"),
])
def test_gguf_header_out_of_bounds_is_refused_before_transformers(tmp_path, block_count, blocks, hidden, message):
    path = _gguf(tmp_path / "m.gguf", block_count, blocks, hidden)
    with pytest.raises(gw.ModelLoadError, match=message):
        gw.load_model(path)


def test_garbage_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(gw.ModelLoadError, match=r"x.gguf: not a valid GGUF file"):
        gw.load_model(tmp_path / "x.gguf")


def test_config_widths_are_bounded(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 10**9}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(gw.ModelLoadError, match=r"hidden_size must be an integer in \[1, 65536\]; got 1000000000"):
        gw.load_model(folder)
