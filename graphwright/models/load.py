"""``graphwright.load_model``: built-in names, local HF folders, GGUF files or a module you have."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelLoadError
from .dtypes import parse_dtype
from .tiny import TINY_MODELS, tiny_model

REAL_MODELS = ("smollm2-135m", "smollm2-135m-moe")
BUILTIN_MODELS = REAL_MODELS + TINY_MODELS


def _tokenizer(folder: Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    except Exception:  # noqa: BLE001 - a model folder without tokenizer files is fine
        return None


def _from_folder(folder: Path, dtype):
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights; graphwright loads safetensors or GGUF only "
            "(pickled .bin/.pt checkpoints are refused because loading them can run arbitrary code)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True,
                                                     local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model in {folder}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return model.eval(), _tokenizer(folder)


def _from_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load GGUF file {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return model.eval(), _tokenizer(path.parent, path.name)


def load_model(name_or_path, dtype=None):
    """Return ``(model, tokenizer)``; ``tokenizer`` is None for tiny models and bare modules.

    ``name_or_path``: a built-in name (:data:`BUILTIN_MODELS`), a local Hugging Face folder
    with safetensors weights, a ``.gguf`` file, or an ``nn.Module`` you already have.
    ``dtype``: None (float32 for files), torch.float32/float16/bfloat16 or their names.
    """
    dtype = parse_dtype(dtype)
    if isinstance(name_or_path, torch.nn.Module):
        model = name_or_path if dtype is None else name_or_path.to(dtype)
        return model.eval(), None
    if not isinstance(name_or_path, (str, Path)):
        raise ModelLoadError(f"load_model takes a built-in name, a path or an nn.Module; got {type(name_or_path).__name__}")
    name = str(name_or_path)
    if name in TINY_MODELS:
        return tiny_model(name, dtype), None
    if name in REAL_MODELS:
        from .smollm2 import converted_folder

        model, tok = _from_folder(converted_folder(), dtype)
        if name == "smollm2-135m-moe":
            from .upcycle import upcycle_to_mixtral

            model = upcycle_to_mixtral(model)
        return model, tok
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_folder(path, dtype)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, dtype)
    if path.is_file():
        raise ModelLoadError(f"{path}: unsupported model file; give a .gguf file or a Hugging Face folder with safetensors")
    raise ModelLoadError(f"unknown model {name!r}: not a built-in ({', '.join(BUILTIN_MODELS)}) and no such file or folder")
