"""One weights file for two graphs: ``decode.onnx`` points at ``model.onnx.data``.

Both graphs are exported from the same parameters, so their external initializers hold the same
bytes (names may differ: the exporter names folded constants such as transposed weights
``val_<n>`` by creation order). ``share_weights`` rewrites each external initializer of the
second graph to the location, offset and length of a first-graph initializer with the same bytes
(matched by SHA-256 and length, then compared byte for byte), and deletes the
second data file when every initializer moved (else both files stay as written: nothing is
shared unless all of it is). This is the disk; in memory, ``session_weights.py`` maps the file once for every
session of the artifact.

``save_sharing`` does the same before the second graph is written, so its weights are never
written at all: each in-memory initializer of at least ``MIN_SHARED_BYTES`` is matched (length,
BLAKE2b, then byte for byte) against the first graph's data file and becomes an ``ExternalTensor``
at that offset; smaller constants are embedded in the graph. When any large initializer has no
match it writes nothing and returns False (the caller then saves and calls ``share_weights``).
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path


def _external(tensor) -> dict:
    return {e.key: e.value for e in tensor.external_data}


MIN_SHARED_BYTES = 1024


def save_sharing(program, path, main_model, min_bytes: int = MIN_SHARED_BYTES) -> bool:
    """Save ``program`` (an ``ONNXProgram``) to ``path`` with its large initializers pointing into
    ``main_model``'s external data file (same folder); False (nothing written) when one has no match."""
    import onnx
    import onnx_ir as ir

    path, main_model = Path(path), Path(main_model)
    m = onnx.load(str(main_model), load_external_data=False)
    where = [_external(t) for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    files = {e.get("location") for e in where}
    if len(files) != 1 or any("length" not in e for e in where) or main_model.parent != path.parent:
        return False
    (data_file,) = files
    new = {}
    with open(main_model.parent / data_file, "rb") as fa, mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as a:
        index = {}
        for e in where:
            off, n = int(e.get("offset", 0)), int(e["length"])
            index.setdefault((n, hashlib.blake2b(a[off:off + n]).digest()), off)
        for value in program.model.graph.initializers.values():
            t = value.const_value
            if t is None or t.nbytes < min_bytes:
                continue
            data = t.tobytes()
            off = index.get((len(data), hashlib.blake2b(data).digest()))
            if off is None or a[off:off + len(data)] != data:
                return False
            new[value] = ir.ExternalTensor(data_file, off, len(data), t.dtype, shape=t.shape, name=value.name,
                                           base_dir=str(path.parent))
    old = {value: value.const_value for value in new}
    try:
        for value, tensor in new.items():
            value.const_value = tensor
        ir.save(program.model, str(path))
    finally:
        for value, tensor in old.items():
            value.const_value = tensor
    return True


def share_weights(folder, main: str, other: str) -> bool:
    """Point ``other``'s external initializers at ``main``'s data file; True when ``other``'s data file was removed."""
    import onnx

    folder = Path(folder)
    ext = onnx.TensorProto.EXTERNAL
    m = onnx.load(str(folder / main), load_external_data=False)
    o = onnx.load(str(folder / other), load_external_data=False)
    where = {t.name: _external(t) for t in m.graph.initializer if t.data_location == ext and "length" in _external(t)}
    mine = [t for t in o.graph.initializer if t.data_location == ext]
    main_files, other_files = {e["location"] for e in where.values()}, {_external(t)["location"] for t in mine}
    if len(main_files) != 1 or len(other_files) != 1 or main_files == other_files:
        return False
    (main_file,), (other_file,) = main_files, other_files
    with open(folder / main_file, "rb") as fa, open(folder / other_file, "rb") as fb, \
            mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as a, mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as b:
        by_bytes = {}
        for w in where.values():
            oa, n = int(w.get("offset", 0)), int(w["length"])
            by_bytes.setdefault((n, hashlib.sha256(a[oa:oa + n]).digest()), w)
        moves = []
        for t in mine:
            e = _external(t)
            if "length" not in e:
                return False
            ob, n = int(e.get("offset", 0)), int(e["length"])
            w = by_bytes.get((n, hashlib.sha256(b[ob:ob + n]).digest()))
            if w is None or a[int(w.get("offset", 0)):int(w.get("offset", 0)) + n] != b[ob:ob + n]:
                return False
            moves.append((t, w))
    for t, w in moves:
        del t.external_data[:]
        for key, value in w.items():
            t.external_data.add(key=key, value=value)
    onnx.save(o, str(folder / other))
    (folder / other_file).unlink()
    return True
