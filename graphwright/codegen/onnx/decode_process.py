"""``decode.onnx`` exported in a second process while this one exports ``model.onnx``.

An evicting recipe whose decode graph is not derived from ``model.onnx`` (``decode_derive.py``,
``decode_swap.py``: StreamingLLM, and H2O / DuoAttention with ``decode_rows.py``) has two independent export
chains: ``torch.export`` + ONNX translation + optimizer + save + stitch of the prompt graph, and the same for
the decode graph. Each is single-threaded Python (``torch.export``'s symbolic tracing, the onnxscript
passes), so on a machine with two cores one core idles while the other runs them one after the other.
Here the decode chain runs in a child process at the same time.

How: this process builds the decode graph (``decode_slots.decode_graph``) and cuts it at the runtime ops
(``export._split_graph``, which reads node metadata), then writes it as data (``graph_payload``: each node's
op, name, target (an operator overload by name, a function by module and qualified name), arguments and
picklable metadata, plus the tensors its ``get_attr`` nodes read, saved with ``torch.save`` so tied weights stay
tied) with the state specs and the model info to a temporary folder. That folder is a private ``mkdtemp`` (mode
0700) this export creates and deletes; the payload and the child's result are pickles only because they never
leave it (written and read by this export's two processes; no user file is ever unpickled). The child is a fresh interpreter
(``python -m graphwright.codegen.onnx.decode_process FOLDER``: spawned, not forked from a process holding
torch's threads, and without re-running the caller's ``__main__``); it rebuilds the graph module
(``rebuild``) and runs ``export._export_split``, the same function the serial route runs, with the parent's
module switches (``SWITCHES``). Its weights point into ``model.onnx.data`` (``shared_weights.save_sharing``),
so before saving it waits for the parent's line on its stdin saying ``model.onnx`` is written (EOF: the parent
is gone or failed, the child stops). It returns the outputs, runtime-op records, whether the weights are shared
and its phase record (wall and CPU seconds, notes), which ``export.py`` merges into ``graphwright.json``
(``decode_*`` phases then overlap the others in wall time; the child's CPU seconds are added to
``total_cpu_s``).

When: ``ENABLED`` "auto" (default) uses the child for a decode graph exported the long way when the step
graph has at least ``MIN_LAYERS`` layers and the machine at least two CPUs (a small graph's chain is shorter
than starting an interpreter that imports torch); True forces it, False never. Any failure of the child
(it cannot start, a graph it cannot rebuild, an export error) is noted (``decode_process``) and the decode
graph is exported in this process as before: the parallel route never changes what an export produces or
which error it raises.

Exact: the child runs the same code on the same graph and weights. Invariant tested
(``tests/onnx/test_decode_process.py``): the rebuilt graph module computes what the original does and holds
the same tied tensors; an export through the child writes ``model.onnx`` and ``decode.onnx`` byte-identical to the
serial route's (tiny Llama, H2O), sharing ``model.onnx.data``, and the artifact verifies; a child that fails falls back
with a note and leaves none of its files.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ENABLED: bool | str = "auto"  # "auto": step graphs of >= MIN_LAYERS layers on >= 2 CPUs; True: always; False: never
MIN_LAYERS = 8
# Module switches of the export chain the child copies from this process: (module, attribute); one that does not exist
# is skipped
SWITCHES = (("graphwright.codegen.onnx.slot_functions", "ENABLED"), ("graphwright.codegen.onnx.optimize", "STEPS"),
            ("graphwright.codegen.onnx.optimize", "FUSE_SIBLINGS"), ("graphwright.codegen.onnx.decode_rows", "SINK_KEYS"),
            ("graphwright.codegen.onnx.decode_rows", "SHARED_ROWS"),
            ("graphwright.codegen.onnx.decode_rows", "DUO_ROWS"), ("graphwright.codegen.onnx.decode_rows", "SPLIT_ROWS"),
            ("graphwright.codegen.onnx.rule_filter", "ENABLED"))
# Node metadata never sent: fake tensors and values derived from them (nothing after ``_split_graph`` reads them)
DROPPED_META = frozenset({"val", "tensor_meta", "eager_input_vals", "example_value", "unbacked_bindings"})
PAYLOAD, RESULT, LOG = "payload.pt", "result.pkl", "child.log"


def wanted(sg) -> bool:
    """Whether an export of ``sg`` (a ``StepGraph``) should use the child for its decode graph (``ENABLED``)."""
    if ENABLED is True or ENABLED is False:
        return ENABLED
    return sg.info.num_layers >= MIN_LAYERS and (os.cpu_count() or 1) >= 2


class _Ref:
    """A node argument that names another node (``graph_payload`` / ``rebuild``)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return (_Ref, (self.name,))


def _target_ref(target):
    if isinstance(target, str):
        return ("attr", target)
    if isinstance(target, torch._ops.OpOverload):
        return ("op", target.namespace, target._schema.name.split("::", 1)[1], target._overloadname)
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module is None or qualname is None or "<" in qualname:
        raise ValueError(f"node target {target!r} cannot be named for another process")
    if _resolve(("fn", module, qualname)) is not target:
        raise ValueError(f"node target {module}.{qualname} is not importable under that name")
    return ("fn", module, qualname)


def _resolve(ref):
    kind = ref[0]
    if kind == "attr":
        return ref[1]
    if kind == "op":
        _, namespace, name, overload = ref
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    obj = importlib.import_module(ref[1])
    for part in ref[2].split("."):
        obj = getattr(obj, part)
    return obj


def _encode(value):
    """Node arguments as data: each ``Node`` in (nested) tuples, lists, dicts and slices becomes a ``_Ref``."""
    return torch.fx.node.map_arg(value, lambda n: _Ref(n.name))


def _decode(value, env: dict):
    """``_encode``'s inverse: each ``_Ref`` becomes the rebuilt node of that name in ``env``."""
    return torch.fx.node.map_aggregate(value, lambda x: env[x.name] if isinstance(x, _Ref) else x)


def _picklable_meta(meta: dict) -> dict:
    out = {}
    for key, value in meta.items():
        if key in DROPPED_META:
            continue
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - metadata that does not pickle (a stack of live objects) is informative only
            continue
        out[key] = value
    return out


def graph_payload(gm: torch.fx.GraphModule) -> dict:
    """``gm`` as data another interpreter can rebuild (``rebuild``): nodes, attributes, ``gm.meta``.

    Raises ``ValueError`` for a graph it cannot describe (a target that is not importable by name, a call of a
    submodule); the caller then exports in its own process."""
    nodes, attrs = [], {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            raise ValueError(f"node {node.name} calls submodule {node.target}: not sent to another process")
        if node.op == "get_attr":
            attrs[node.target] = _attr(gm, node.target)
        target = node.target if node.op in ("call_function", "get_attr") else None
        nodes.append((node.op, node.name, None if target is None else _target_ref(target),
                      node.target if node.op in ("placeholder", "output") else None,
                      _encode(tuple(node.args)), _encode(dict(node.kwargs)), _picklable_meta(node.meta), node.type))
    meta = dict(getattr(gm, "meta", {}) or {})
    pickle.dumps((nodes, meta))  # fails here (ValueError for the caller) rather than in the child
    return {"nodes": nodes, "attrs": attrs, "meta": meta}


def _attr(gm, qualified: str):
    obj = gm
    for part in qualified.split("."):
        obj = getattr(obj, part)
    return obj


def rebuild(payload: dict) -> torch.fx.GraphModule:
    """The graph module ``graph_payload`` described (same nodes, names, arguments and tensors)."""
    graph = torch.fx.Graph()
    env = {}
    for op, name, target_ref, own_target, args, kwargs, meta, type_ in payload["nodes"]:
        args, kwargs = _decode(args, env), _decode(kwargs, env)
        target = own_target if target_ref is None else _resolve(target_ref)
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=type_)
        if node.name != name:
            raise ValueError(f"node {name} rebuilt as {node.name}")
        node.meta.update(meta)
        env[name] = node
    root = torch.nn.Module()  # a module root, not a dict: GraphModule then copies the attributes in node order, as
    for qualified, value in payload["attrs"].items():  # the original's were (a dict root sorts them by depth, which
        owner = root  # reorders the exported program's parameters and so the ONNX initializers)
        *path, field = qualified.split(".")
        for part in path:
            if not hasattr(owner, part):
                setattr(owner, part, torch.nn.Module())
            owner = getattr(owner, part)
        setattr(owner, field, value)
    gm = torch.fx.GraphModule(root, graph)
    gm.meta.update(payload["meta"])
    return gm


class DecodeJob:
    """The child exporting ``decode.onnx`` (``start``); ``model_saved`` lets it save, ``result`` waits for it."""

    def __init__(self, proc: subprocess.Popen, folder: Path):
        self.proc, self.folder = proc, folder

    @classmethod
    def start(cls, sg, gm, split: tuple, path: Path, opset: int, external_data: bool, share_with) -> DecodeJob:
        """Write the payload and start the child on it. ``split``: ``(records, outputs, inputs, host)`` of
        ``_split_graph``; ``share_with``: the graph whose data file the decode weights point into once written."""
        folder = Path(tempfile.mkdtemp(prefix="gw-decode-"))
        try:
            payload = {"graph": graph_payload(gm), "state": list(sg.state), "extra_inputs": list(sg.extra_inputs),
                       "info": sg.info, "split": split, "path": str(path), "opset": opset, "external_data": external_data,
                       "share_with": None if share_with is None else str(share_with),
                       "switches": {f"{m}:{a}": getattr(importlib.import_module(m), a) for m, a in SWITCHES
                                    if hasattr(importlib.import_module(m), a)}}
            torch.save(payload, folder / PAYLOAD)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([_package_root(), *(p for p in sys.path if p)])}
            with open(folder / LOG, "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", __name__, str(folder)], stdin=subprocess.PIPE, stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(proc, folder)

    def model_saved(self, ok: bool = True) -> None:
        """Tell the child ``model.onnx`` (and its data file) is written (``ok``) or will not be (it then stops)."""
        try:
            self.proc.stdin.write(b"go\n" if ok else b"stop\n")
            self.proc.stdin.flush()
        except OSError:  # the child has exited already: result() says why
            pass

    def result(self) -> dict:
        """Wait for the child; its ``{"outputs", "records", "shared", "phases"}`` or ``RuntimeError`` saying why not."""
        try:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            rc = self.proc.wait()
            out = self.folder / RESULT
            if rc == 0 and out.exists():
                res = pickle.loads(out.read_bytes())
                if "error" not in res:
                    return res
                raise RuntimeError(res["error"])
            tail = (self.folder / LOG).read_bytes()[-600:].decode(errors="replace").strip()
            raise RuntimeError(f"decode export process exited with {rc}: {tail}")
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child if it still runs and remove its folder."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _package_root() -> str:
    """The folder holding the ``graphwright`` package (this file is graphwright/codegen/onnx/decode_process.py)."""
    return str(Path(__file__).resolve().parents[3])


def _child(folder: Path) -> dict:
    """The child's work: rebuild the decode graph and run ``export._export_split`` on it."""
    from types import SimpleNamespace

    from . import export
    from .phases import Phases

    ready, c0 = time.perf_counter(), time.process_time()  # perf_counter: CLOCK_MONOTONIC, comparable across processes
    payload = torch.load(folder / PAYLOAD, weights_only=False, mmap=True)
    for name, value in payload["switches"].items():
        module, attr = name.split(":")
        setattr(importlib.import_module(module), attr, value)
    phases = Phases()
    with phases("decode_rebuild"):
        gm = rebuild(payload["graph"])
    sg = SimpleNamespace(state=payload["state"], extra_inputs=payload["extra_inputs"], info=payload["info"])
    records, outputs, inputs, host = payload["split"]
    share_with = payload["share_with"]
    signalled = []

    def before_save():  # the prompt graph's data file must be complete before the weights point into it
        if not signalled:
            signalled.append(sys.stdin.readline().strip())
        if signalled[0] != "go":
            raise SystemExit(3)
        return share_with if share_with is not None and Path(share_with + ".data").exists() else None

    outputs, records, shared = export._export_split(sg, gm, records, outputs, inputs, host, True, Path(payload["path"]),
                                                    payload["opset"], payload["external_data"], phases, "decode_",
                                                    before_save=before_save)
    rec = phases.to_json()
    rec["ready_at"], rec["startup_cpu_s"] = ready, round(c0, 2)  # when the imports were done, and their CPU seconds
    return {"outputs": outputs, "records": records, "shared": shared, "phases": rec}


def main(folder: Path) -> int:
    """The child's entry point: the result (or the error) pickled to ``folder / RESULT``."""
    try:
        res = _child(folder)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which exports the decode graph itself
        res = {"error": f"{type(exc).__name__}: {str(exc).strip()[:600]}"}
    (folder / RESULT).write_bytes(pickle.dumps(res))
    return 0


if __name__ == "__main__":  # run as ``python -m``: the module's own copy (its ``_Ref`` is the one the payload names)
    from graphwright.codegen.onnx import decode_process

    sys.exit(decode_process.main(Path(sys.argv[1])))
