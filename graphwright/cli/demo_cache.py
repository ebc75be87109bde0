"""The demo's ONNX artifact, reused between runs when nothing that made it has changed.

``graphwright demo`` exports its compiled model (about a minute on two cores) at every run; the
same model, recipe and code give the same artifact, so a later run loads the one on disk instead.
The key is a sha256 over everything the artifact depends on: the model's weights (every parameter
and buffer: name, dtype, shape, bytes), the recipe string, graphwright's own source files (its
version string does not change with the code) and the versions of torch, onnx, onnxscript and
onnxruntime. It is written to ``<export folder>.key`` beside the folder (not inside it:
``graphwright.load`` refuses files the export did not record), after the export succeeded.

An artifact is reused only when the key file matches and ``graphwright.load`` accepts the folder
(verification passed, every file's sha256 as recorded); otherwise it is exported again under
``export_onnx``'s own rule: only a previous export's files are replaced, a folder holding anything
else is refused, so a user's files are never overwritten.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

KEY_SUFFIX = ".key"
PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime")


def artifact_key(model, recipe: str) -> str:
    """sha256 hex of what the demo's export depends on (module docstring)."""
    import importlib.metadata

    import torch

    h = hashlib.sha256()
    h.update(f"recipe={recipe}\n".encode())
    for pkg in PACKAGES:
        try:
            h.update(f"{pkg}={importlib.metadata.version(pkg)}\n".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{pkg}=absent\n".encode())
    src = Path(__file__).resolve().parents[1]
    for path in sorted(src.rglob("*.py")):
        h.update(str(path.relative_to(src)).encode())
        h.update(path.read_bytes())
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def key_file(folder) -> Path:
    folder = Path(folder)
    return folder.with_name(folder.name + KEY_SUFFIX)


def cached(folder, key: str):
    """The loaded artifact in ``folder`` when its key file holds ``key`` and ``graphwright.load`` accepts it, else None."""
    import graphwright as gw
    from graphwright.errors import GraphwrightError

    kf = key_file(folder)
    if not kf.is_file() or kf.read_text(encoding="utf-8").strip() != key:
        return None
    try:
        return gw.load(folder)
    except GraphwrightError:
        return None


def remember(folder, key: str) -> None:
    """Record ``key`` for the artifact just exported to ``folder``."""
    key_file(folder).write_text(key + "\n", encoding="utf-8")


def forget(folder) -> None:
    """Drop the key before a new export, so an interrupted one is never taken for the old artifact."""
    key_file(folder).unlink(missing_ok=True)
