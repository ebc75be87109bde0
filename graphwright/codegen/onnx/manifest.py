"""Which files an export wrote, with their content hashes: ``graphwright.json["files"]``.

At export, every file graphwright writes (the ONNX graphs, their external weights, the tokenizer
files) is recorded as ``{relative path: {"sha256", "bytes"}}``. At load, ``check_files`` hashes each
recorded file again and refuses a mismatch naming the file, and refuses an unrecorded file that
the loader would read (a ``*.onnx``/``*.data`` file at the top of the folder, anything in the
tokenizer folder), so changed weights or a planted tokenizer file are errors, not different tokens.
Hashing streams each file in 1 MiB chunks (memory stays flat for the 540 MB SmolLM2 weights).

The same record says which files are graphwright's: re-exporting into the folder replaces only
those (``owned_files``); anything else a user keeps there stays, and a file with a name the export
needs that it did not write is an error, not an overwrite.

The hashes are integrity checks, not signatures: they catch corruption and edits of the weights
after export, not an author who rewrites ``graphwright.json`` together with the files.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from ...errors import GraphwrightError

CHUNK = 1 << 20
# top-level files an export may write (gemfilter_export.SELECT_MODEL and the decode graph included)
ONNX_SUFFIXES = (".onnx", ".data")


def sha256_file(path) -> str:
    """SHA-256 of a file, read in ``CHUNK`` pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def record_files(folder, names) -> dict:
    """``{name: {"sha256", "bytes"}}`` for each existing file ``folder/name`` (paths relative, '/'-separated)."""
    folder = Path(folder)
    out = {}
    for name in sorted(set(names)):
        p = folder / name
        if p.is_file():
            out[Path(name).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def _required(folder: Path, meta: dict) -> list:
    """Files the loader reads, which must be recorded: the graphs named in the metadata, every
    ``*.onnx``/``*.data`` at the folder's top (ORT follows a graph's external-data names) and every
    file in the tokenizer folder (``AutoTokenizer`` reads whatever is there)."""
    req = [meta["model_file"]]
    for key in ("decode", "gemfilter"):
        if isinstance(meta.get(key), dict) and meta[key].get("model_file"):
            req.append(meta[key]["model_file"])
    if meta.get("external_data"):
        req.append(meta["external_data"])
    req += [p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(ONNX_SUFFIXES)]
    tok = folder / meta["tokenizer"] if meta.get("tokenizer") else None
    if tok is not None and tok.is_dir():
        req += [p.relative_to(folder).as_posix() for p in sorted(tok.rglob("*")) if not p.is_dir()]
    return [Path(r).as_posix() for r in dict.fromkeys(req)]


def check_files(folder, meta: dict) -> None:
    """Raise ``GraphwrightError`` unless every recorded file is present with its recorded hash and
    every file the loader reads is recorded (``meta`` already passed ``metadata_schema.validate``)."""
    from .artifact import METADATA

    folder = Path(folder)
    files = meta.get("files")
    if files is None:
        raise GraphwrightError(f"{folder / METADATA}: no content hashes ('files'); the artifact predates them or they "
                               "were removed. Re-export it, or pass verify_hashes=False to load it unchecked")
    unrecorded = [r for r in _required(folder, meta) if r not in files]
    if unrecorded:
        raise GraphwrightError(f"{folder}: {', '.join(unrecorded[:5])} not recorded in {METADATA}['files'] (not written "
                               "by the export); remove it or re-export the model")
    for name, rec in files.items():
        p = folder / name
        if not p.is_file():
            raise GraphwrightError(f"{folder}: missing {name} (recorded in {METADATA}); re-export the model")
        size = p.stat().st_size
        if size != rec["bytes"]:
            raise GraphwrightError(f"{p}: {size} bytes, {rec['bytes']} recorded at export: the file changed after "
                                   "export (truncated or replaced); re-export the model")
        got = sha256_file(p)
        if got != rec["sha256"]:
            raise GraphwrightError(f"{p}: content hash mismatch (sha256 {got[:16]}..., {rec['sha256'][:16]}... recorded "
                                   "at export): the file changed after export; re-export the model")


def owned_files(folder) -> list | None:
    """Files of a previous export in ``folder`` that a new export may replace: those its valid
    ``graphwright.json`` records (plus ``graphwright.json``); None when the folder holds no valid export.
    An export from before the ``files`` record owns only its fixed top-level graph names."""
    from .artifact import METADATA, read_metadata

    folder = Path(folder)
    try:
        meta = read_metadata(folder)
    except GraphwrightError:
        return None
    if meta.get("files") is not None:
        return [METADATA, *meta["files"]]
    return [METADATA, *(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(ONNX_SUFFIXES))]


def check_no_foreign(folder: Path, names, owned) -> None:
    """Refuse to write over a file graphwright did not write (``names``: what the export will write)."""
    foreign = [n for n in names if (folder / n).exists() and Path(n).as_posix() not in set(owned or ())]
    if foreign:
        raise GraphwrightError(f"{folder}: {', '.join(foreign[:5])} exist(s) and {'were' if len(foreign) > 1 else 'was'} not "
                               "written by a graphwright export (no graphwright.json records it); move it away or "
                               "export to another folder. graphwright only replaces files its own export recorded")


def tokenizer_files(tokenizer) -> list:
    """Names (relative to the tokenizer folder) that ``save_pretrained`` writes for ``tokenizer``."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())


def save_tokenizer(tokenizer, folder: Path, sub: str, owned) -> list:
    """Write the tokenizer's files into ``folder/sub`` without replacing any file graphwright did not
    write (``owned``: paths relative to ``folder``); returns the written paths relative to ``folder``."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
        rel = [f"{sub}/{n}" for n in names]
        check_no_foreign(folder, rel, owned)
        for n, r in zip(names, rel):
            (folder / r).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / n, folder / r)
    return rel
