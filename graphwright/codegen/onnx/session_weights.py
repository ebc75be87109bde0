"""One copy of an artifact's weights in memory for all of its ONNX Runtime sessions.

An evicting artifact runs two graphs: ``model.onnx`` (prompt steps) and ``decode.onnx`` (one-token steps). Both read
the same bytes of ``model.onnx.data`` (``shared_weights.py`` points the second graph at the first graph's file), but
each ``InferenceSession`` reads its external initializers into memory of its own, and its MatMul kernels keep a
prepacked copy besides: on ``smollm2-135m`` loading the ``streaming`` artifact left the process 564 MB larger than
loading the dense one, the whole weights file a second time.

``ArtifactWeights`` maps the data file read-only (``mmap``; the pages are the page cache's, shared by every reader)
and hands each session the same ``OrtValue`` views through ``SessionOptions.add_initializer``: ONNX Runtime then
uses that memory as is and reads nothing from the file itself. Two consequences, both handled here:

- A user-provided initializer cannot be freed by ONNX Runtime, so a kernel that prepacks it would hold a second copy:
  the sessions run with ``session.disable_prepacking=1`` (``prepack_off``). MLAS then packs the right-hand matrix per
  call, one-row (decode) calls included: that is the speed cost below. (ONNX Runtime's C API can share prepacked
  weights between sessions, ``CreateSessionWithPrepackedWeightsContainer``; its Python API does not expose it.)
  Options that set the key to ``0`` themselves ask for prepacked weights: their sessions load their own copy.
- ``add_initializer`` keeps its values in the ``SessionOptions`` object, and ONNX Runtime can neither copy options nor
  remove an initializer from them. The graph's external initializers are therefore renamed to names unique to this
  load and to their bytes (``gw_weights<N>/<i>``: both graphs name one region alike), so a caller's options reused for
  another artifact never feed it these values (ONNX Runtime ignores an initializer name its graph does not have); the
  values stay referenced by the options until they are dropped (a mapped file, no anonymous memory).

Opt-in (``graphwright.load(path, share_weights=True)``; ``ENABLED`` is the default when the argument is None, off),
because it is a trade, measured on SmolLM2-135M at 8k/4k prompts (README "Decode speed", session 23):

- memory: loading the ``streaming`` artifact takes 411 MB instead of 1,255, and its 8k generation peaks at 1,839 MB
  instead of 2,262 (``bench/peak_rss.py --shared-weights on|off``; dense: 2,190, one session, nothing to share);
- speed: decode steps are 12-13% slower (``bench/ab_onnx_switch.py --switch session_weights``: MLAS packs each
  unprepacked weight per one-row call) and prompt steps 12% faster (a 2k StreamingLLM prompt step).

``graphwright.load`` maps only an artifact that runs more than one graph: a dense artifact has one session, nothing to
share, and would only lose its prepacked weights.
"""

from __future__ import annotations

import itertools
import mmap
from pathlib import Path

ENABLED = False  # the default of graphwright.load(share_weights=None)

PREPACK_KEY = "session.disable_prepacking"

_loads = itertools.count()


class ArtifactWeights:
    """The external initializers of one artifact folder, mapped once; ``attach`` makes a graph read them."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.prefix = f"gw_weights{next(_loads)}/"
        self._files: dict = {}  # location -> (file object, mmap)
        self._values: dict = {}  # (location, offset, length, dtype, shape) -> (name, OrtValue)
        self._options: list = []  # (SessionOptions, names added to it): both graphs of an artifact may share options
        self.mapped_bytes = 0

    def _map(self, location: str):
        from ...errors import GraphwrightError

        if location not in self._files:
            path = (self.folder / location).resolve()
            if path.parent != self.folder.resolve():
                raise GraphwrightError(f"{self.folder}: external data location {location!r} leaves the artifact folder")
            if not path.is_file():
                raise GraphwrightError(f"{self.folder}: missing {location} (the weights file); re-export the model")
            f = open(path, "rb")  # noqa: SIM115 - kept open as long as the mapping
            self._files[location] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return self._files[location][1]

    def _value(self, tensor) -> tuple:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import helper

        from ...errors import GraphwrightError

        ext = {e.key: e.value for e in tensor.external_data}
        location, offset = ext["location"], int(ext.get("offset", 0))
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(int(d) for d in tensor.dims)
        count = int(np.prod(shape, dtype=np.int64))
        length = int(ext.get("length", count * dtype.itemsize))
        key = (location, offset, length, dtype.str, shape)
        if key not in self._values:
            data = self._map(location)
            if length != count * dtype.itemsize or offset + length > len(data):
                raise GraphwrightError(f"{self.folder}: initializer {tensor.name!r} ({onnx.TensorProto.DataType.Name(tensor.data_type)} "
                                       f"{list(shape)}) does not fit {location} at offset {offset}, length {length} "
                                       f"(file of {len(data)} bytes); the artifact is corrupt, re-export it")
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
            self._values[key] = (f"{self.prefix}{len(self._values)}", ort.OrtValue.ortvalue_from_numpy(array))
            self.mapped_bytes += length
        return self._values[key]

    def attach(self, proto, session_options) -> int:
        """Rename ``proto``'s external initializers (in place) and add their mapped values to ``session_options``;
        returns how many. Inline initializers (small constants) stay in the graph."""
        import onnx

        added = next((names for so, names in self._options if so is session_options), None)
        if added is None:
            added = set()
            self._options.append((session_options, added))
        count = 0
        renamed = {}
        for tensor in proto.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            name, value = self._value(tensor)
            if name not in added:  # the other graph of the artifact added it to these options already
                session_options.add_initializer(name, value)
                added.add(name)
            renamed[tensor.name] = name
            tensor.name = name
            count += 1
        if renamed:
            _rename_uses(proto.graph, renamed)
        return count


def _rename_uses(graph, renamed: dict) -> None:
    """Initializers are graph-level names: their readers in the graph and in every nested subgraph (If/Loop
    branches read outer names) follow the rename. A subgraph that defines the same name itself shadows it."""
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                own = {t.name for t in sub.initializer} | {i.name for i in sub.input} | {o for n in sub.node for o in n.output}
                _rename_uses(sub, {k: v for k, v in renamed.items() if k not in own})
    for v in list(graph.value_info) + list(graph.output):
        if v.name in renamed:
            v.name = renamed[v.name]


def prepack_off(session_options) -> bool:
    """Turn prepacking off in ``session_options`` for a session that reads mapped weights; False (the caller's options
    set ``session.disable_prepacking=0``: they asked for prepacked weights) when the weights must not be shared.
    ONNX Runtime cannot unset a key: options the caller passes come back with the key set to ``1``."""
    try:
        value = session_options.get_session_config_entry(PREPACK_KEY)
    except Exception:  # noqa: BLE001 - not set
        value = None
    if value == "0":
        return False
    if value is None:
        session_options.add_session_config_entry(PREPACK_KEY, "1")
    return True


def file_session(model_path, session_options, providers, weights=None):
    """An InferenceSession of the graph file ``model_path``; with ``weights`` (an ``ArtifactWeights`` of its folder) its
    external initializers are the mapped ones, else ONNX Runtime reads them itself."""
    import onnxruntime as ort

    if weights is None:
        return ort.InferenceSession(str(model_path), sess_options=session_options, providers=providers)
    import onnx

    from . import inplace_kv

    proto = onnx.load(str(model_path), load_external_data=False)
    return inplace_kv.session(proto, model_path, providers, session_options, weights)
