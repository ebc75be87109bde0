"""KVzip's replay (arXiv 2505.23416) for an exported artifact: ``graphwright.load(dir)`` of ``evict(score="kvzip")``.

The same ``Runtime.after_prompt`` as the torch runtime's (``kvzip_replay.KVzipReplay``: chunking, replay ids,
``replay_scores``, ``keep_sets``, ``compact_packed``; inherited, not copied) with the replay step run by ONNX
Runtime: ``kvzip_replay.onnx`` (``codegen/onnx/kvzip_export.py``) returns each KVzip layer's replay q, k and
k_pos from the row's cache, as the torch replay graph does. So prefill (``model.onnx``) -> replay graph ->
scores and selection (host-side torch) -> packed per-head cache -> decode (``model.onnx``, appends), and a
reusable context (``prefill``) is compressed once. Exact setting: a fraction budget >= 1.0 runs no replay.
Tested (``tests/onnx/test_kvzip_onnx.py``): the kept positions per (layer, head), logits and greedy tokens
equal the torch runtime's on tiny Llama, a context reused for two questions, budget 1.0 equal to dense.
"""

from __future__ import annotations

from pathlib import Path

from ..codegen.onnx.kvzip_export import OnnxReplay
from .kvzip_replay import KVzipReplay


class OnnxKVzipReplay(KVzipReplay):
    """``KVzipReplay`` whose replay graph is the artifact's ``kvzip_replay.onnx``.

    ``entry``: ``graphwright.json["kvzip"]`` (schema-checked); ``state_specs``: the artifact's state, in step order."""

    def __init__(self, path, entry: dict, state_specs, providers=None, session_options=None, weights=None):
        # the notes from the artifact instead of the runtime graph (no latent layers: refused at export,
        # kvzip_export.check_exportable); the replay graph is the artifact's
        self._bind({"settings": dict(entry["settings"]), "layers": [list(r) for r in entry["layers"]],
                    "replay": dict(entry["replay"])}, state_specs)
        self.scales = {layer: float(s) for layer, s in zip(self.layers, entry["scales"])}
        self._run = OnnxReplay(Path(path), entry, state_specs, providers, session_options, weights)
