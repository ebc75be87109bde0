"""``graphwright.load_model``: built-in names, local HF folders, GGUF files or a module you have."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .dtypes import parse_dtype
from .json_files import read_json
from .tiny import TINY_MODELS, tiny_model

REAL_MODELS = ("smollm2-135m", "smollm2-135m-moe")
BUILTIN_MODELS = REAL_MODELS + TINY_MODELS
MAX_LAYERS = 1024  # the deepest public decoder-only LLMs have ~130 layers; also bounds graphwright.json
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# widths a config may ask transformers to allocate before any weight is read (the largest public
# LLMs: hidden 16,384-25,600, vocabularies ~260k, MLP widths ~100k); beyond these it is not a model
SIZE_BOUNDS = {"hidden_size": 1 << 16, "n_embd": 1 << 16, "intermediate_size": 1 << 20, "vocab_size": 1 << 22,
               "num_attention_heads": 4096, "num_key_value_heads": 4096}
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


# files a Hugging Face tokenizer is read from; a folder with none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _tokenizer(folder: Path, gguf_file: str | None = None):
    """The folder's tokenizer, never running code from it (``trust_remote_code=False``: an ``auto_map``
    in ``tokenizer_config.json`` is not followed, and transformers does not prompt); None if it has none.

    A folder without tokenizer files gets None, not what ``AutoTokenizer`` builds from ``config.json``
    alone (for Qwen2 an empty BPE tokenizer whose only token is ``<|endoftext|>``: every text encodes
    to no ids, so evaluation and calibration failed far from the cause)."""
    from transformers import AutoTokenizer

    if gguf_file is None and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a model folder without tokenizer files is fine
        if _asks_for_code(folder / "tokenizer_config.json"):
            raise ModelLoadError(f"{folder}: its tokenizer_config.json names custom tokenizer code (auto_map) and has no "
                                 "tokenizer graphwright can load without running it; graphwright never runs a model "
                                 f"folder's code ({type(exc).__name__}: {str(exc).strip()[:200]})") from None
        return None


def _asks_for_code(path: Path) -> bool:
    try:
        cfg = read_json(path, "tokenizer_config.json", ModelLoadError)
    except ModelLoadError:
        return False
    return isinstance(cfg, dict) and "auto_map" in cfg


def _check_config(folder: Path) -> None:
    """Refuse a ``config.json`` whose layer count is out of bounds or above what the weights hold,
    before transformers builds (and randomly initialises) that many layers."""
    cfg = read_json(folder / "config.json", "config.json", ModelLoadError, max_bytes=16 << 20)
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{folder / 'config.json'}: expected a JSON object, got {type(cfg).__name__}")
    sub = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key, value in [*((k, cfg[k]) for k in LAYER_KEYS if k in cfg), *((f"text_config.{k}", sub[k]) for k in LAYER_KEYS if k in sub)]:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LAYERS:
            raise ModelLoadError(f"{folder / 'config.json'}: {key} must be an integer in [1, {MAX_LAYERS}]; got {str(value)[:40]}")
        held = _weight_layers(folder)
        if held is not None and value > held:
            raise ModelLoadError(f"{folder / 'config.json'}: {key} asks for {value} layers but the safetensors weights "
                                 f"hold {held}; the config does not belong to these weights")
    for key, bound in SIZE_BOUNDS.items():
        for where, value in ((key, cfg.get(key)), (f"text_config.{key}", sub.get(key))):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound):
                raise ModelLoadError(f"{folder / 'config.json'}: {where} must be an integer in [1, {bound}]; got {str(value)[:40]}")


def _check_gguf(path: Path) -> None:
    """Refuse a GGUF whose header asks for more layers than ``MAX_LAYERS`` or than its tensors hold, or
    widths past ``SIZE_BOUNDS``, before transformers allocates them (gguf's own reader: header and
    tensor index only, memory-mapped)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = _gguf_value(reader, "general.architecture")
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file
        raise ModelLoadError(f"{path}: not a valid GGUF file ({type(exc).__name__}: {str(exc)[:200]})") from None
    blocks = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    count = _gguf_value(reader, f"{arch}.block_count")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_LAYERS:
        raise ModelLoadError(f"{path}: {arch}.block_count must be an integer in [1, {MAX_LAYERS}]; got {str(count)[:40]}")
    if count > len(blocks):
        raise ModelLoadError(f"{path}: {arch}.block_count asks for {count} layers but the file's tensors hold {len(blocks)}")
    for key, bound in (("embedding_length", SIZE_BOUNDS["hidden_size"]), ("feed_forward_length", SIZE_BOUNDS["intermediate_size"]),
                       ("vocab_size", SIZE_BOUNDS["vocab_size"]), ("attention.head_count", SIZE_BOUNDS["num_attention_heads"])):
        value = _gguf_value(reader, f"{arch}.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound):
            raise ModelLoadError(f"{path}: {arch}.{key} must be an integer in [1, {bound}]; got {str(value)[:40]}")


def _gguf_value(reader, key: str):
    """A scalar GGUF metadata value (int or str), or None when absent."""
    field = reader.fields.get(key)
    if field is None or len(field.data) != 1:
        return None
    part = field.parts[field.data[0]]
    if part.dtype.kind == "u" and part.dtype.itemsize == 1 and key.startswith("general."):
        return bytes(part).decode("utf-8", "replace")
    return int(part[0]) if part.dtype.kind in "iu" else None


def _weight_layers(folder: Path) -> int | None:
    """Layer count in the safetensors weights' tensor names (``...layers.<i>...``); headers only."""
    from safetensors import safe_open

    top = -1
    for f in folder.glob("*.safetensors"):
        try:
            with safe_open(str(f), "pt") as st:
                names = list(st.keys())
        except Exception:  # noqa: BLE001 - a corrupt file: from_pretrained reports it
            return None
        top = max([top, *(int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n)))])
    return top + 1 if top >= 0 else None


def _from_folder(folder: Path, dtype):
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights; graphwright loads safetensors or GGUF only "
            "(pickled .bin/.pt checkpoints are refused because loading them can run arbitrary code)"
        )
    _check_config(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True,
                                                     local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model in {folder}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return model.eval(), _tokenizer(folder)


def _from_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    _check_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32,
                                                     local_files_only=True, trust_remote_code=False)
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
