"""``torch.export`` without the ``tensor_meta`` it stores beside every node's fake value.

While ``torch.export`` traces a graph, ``proxy_tensor.set_meta`` stores for every node both
``meta["val"]`` (the fake tensor) and ``meta["tensor_meta"]`` (``shape_prop._extract_tensor_metadata``:
shape, dtype, strides, memory format, quantisation; "best effort; prefer using val" says torch). With
symbolic shapes (graphwright's dynamic batch / sequence / cache dims) the memory-format probe runs
symbolic ``is_contiguous`` checks for every node: 17 s of a 124 s cProfile of SmolLM2-135M's
``torch.export`` (identity, loaded machine), about 14%. Nothing on graphwright's route reads
``tensor_meta`` afterwards: the ONNX translation (``torch.onnx`` ``_core``), the type-promotion pass and
``exporter_shortcuts.py`` read ``meta["val"]``; the only reader in ``torch.onnx`` is its analysis report
(which tolerates ``None``); the exporter's full path (``run_decompositions``) retraces and stores fresh
metadata anyway.

``no_tensor_meta()``: a context manager around ``torch.export.export`` that makes ``set_meta`` store
``tensor_meta = None``. ``ENABLED = False`` turns it off (the A/B of ``bench/export_time.py --meta-ab``).
When the torch internal it patches is missing (another torch version), nothing is patched: the export
is slower, never different.

Invariant tested (``tests/onnx/test_trace_meta.py``): ``model.onnx`` is byte-identical with and without
it (tiny Llama identity, tiny Qwen2 H2O with its in-graph prompt eviction), every ``val`` is still
stored, and the patch is undone after the export, also when it raises.
"""

from __future__ import annotations

import contextlib

ENABLED = True


def _none(*args, **kwargs):
    return None


@contextlib.contextmanager
def no_tensor_meta():
    """Inside: ``torch.export`` stores ``meta["tensor_meta"] = None`` (see the module docstring)."""
    from torch.fx.experimental import proxy_tensor

    original = getattr(proxy_tensor, "_extract_tensor_metadata", None)
    if not ENABLED or original is None:
        yield False
        return
    proxy_tensor._extract_tensor_metadata = _none
    try:
        yield True
    finally:
        proxy_tensor._extract_tensor_metadata = original
