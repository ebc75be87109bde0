"""Head sets on disk: ``{layer: [heads]}`` JSON files, and where ``heads='auto'`` looks.

A head set file is ``{"heads": {"3": [0, 5], ...}, "scores": ..., "settings": ...}`` (a bare
``{layer: [heads]}`` mapping, as in the PASTA repo's ``config/head_config``, is accepted too).
``profile_heads`` also caches its result under ``$GRAPHWRIGHT_CACHE/steer_heads/<model key>.json``;
the key hashes the model's shape *and* a slice of its weights, so a fine-tune of the same
architecture never picks up another model's heads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..models.cache_dir import cache_dir


def model_key(sg) -> str:
    """A short stable id of the captured model: architecture, sizes and a weight fingerprint."""
    info = sg.info
    h = hashlib.sha1(f"{info.architecture}/{info.num_layers}/{info.num_heads}/{info.hidden_size}/{info.vocab_size}".encode())
    for _, p in sorted(sg.gm.named_parameters())[:2]:
        h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return f"{info.model_type}-{info.num_layers}x{info.num_heads}-{h.hexdigest()[:12]}"


def auto_head_path(key: str | None) -> Path:
    return cache_dir() / "steer_heads" / f"{key or 'unknown'}.json"


def save_head_set(path, heads: dict, **extra) -> Path:
    """Write ``{"heads": {layer: [heads]}, **extra}`` as JSON (layers as string keys, sorted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"heads": {str(k): sorted(v) for k, v in sorted(heads.items())}, **extra}
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def load_head_set(path) -> dict:
    """``{layer: [heads]}`` (int layers) from a head-set file."""
    data = json.loads(Path(path).read_text())
    heads = data.get("heads", data)
    return {int(k): list(v) for k, v in heads.items()}
