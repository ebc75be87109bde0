"""The ONNX artifact's format and its step function: ``graphwright.json`` I/O and ``OnnxStep``.

``OnnxStep`` is to an exported artifact what ``lower()``'s GraphModule is to the torch backends:
a step function ``(input_ids, positions, logits_index, state) -> (logits, state)`` that the
runtime's prefill/decode loop drives (``graphwright.load`` wraps it in ``OnnxModel``). It lives in
codegen so export can verify its own output without importing the runtime layer above it.

Two sessions when the export has a decode graph (``graphwright.json["decode"]``, see
``decode_slots.py``): ``model.onnx`` for prompt steps (T > 1), ``decode.onnx`` for T = 1 steps,
whose evicting layers' state is padded once to its slot capacity and then keeps its shape.

I/O binding (``io_binding=True``, the default on CPU): a step with no runtime ops binds every input
by pointer to the torch tensor's memory and every output to a torch tensor allocated here with the
shape it will have (logits [B, len(logits_index), V]; a state grows by T along its seq dim, Hk x T for a packed
per-head cache (``packed_growth``), or keeps its shape in the decode graph's capacity states), so ORT writes the next state straight into
the tensors the runtime feeds back: no numpy arrays and no output copy. A step with runtime ops
(``split.py``), a bf16 model (numpy has no bf16) or a GPU provider uses ``session.run``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...capture.step_graph import ModelInfo, StateSpec
from ...errors import GraphwrightError
from . import decode_attention, inplace_kv, inplace_slots, packed_decode, prompt_attention, prompt_rows, state_order

METADATA = "graphwright.json"
MODEL = "model.onnx"
FORMAT = "graphwright-onnx"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise GraphwrightError(f"{METADATA}: unknown dtype {name!r}")
    return dtype


def spec_to_json(spec: StateSpec) -> dict:
    return {"name": spec.name, "kind": spec.kind, "shape": list(spec.shape), "dtype": dtype_name(spec.dtype),
            "seq_dim": spec.seq_dim, "layer": spec.layer}


def spec_from_json(d: dict) -> StateSpec:
    return StateSpec(d["name"], d["kind"], tuple(d["shape"]), parse_dtype_name(d["dtype"]), int(d["seq_dim"]), d.get("layer"))


def info_to_json(info: ModelInfo) -> dict:
    d = dict(info.__dict__)
    d["dtype"] = dtype_name(info.dtype)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def info_from_json(d: dict) -> ModelInfo:
    d = dict(d)
    d["dtype"] = parse_dtype_name(d["dtype"])
    for k in ("eos_token_id", "attention_modules", "moe_modules", "windows"):
        d[k] = tuple(d.get(k) or ())
    known = ModelInfo.__dataclass_fields__
    return ModelInfo(**{k: v for k, v in d.items() if k in known})


def default_providers() -> list:
    """CUDA when onnxruntime-gpu is installed and a GPU is visible, CPU otherwise (and as fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxStep:
    """An ``onnxruntime.InferenceSession`` as a graphwright step function.

    ``state_names``: the state in step order; a state whose ``<name>_next`` is not a graph output
    is produced by a runtime op (``records``, see ``codegen/onnx/split.py``) applied to the
    session's ``cut<i>`` outputs. ``extras``: the extra inputs (name -> kind); one not given
    is fed as zeros [B, 1] (for steering that is the unsteered path: the bias is exactly 0).
    """

    def __init__(self, model_path, input_names, output_names, providers=None, session_options=None,
                 state_names=None, records=(), extras=None, decode=None, seq_dims=None, io_binding=True, state_kinds=None,
                 prompt_capacity=None, growth=None, weights=None):
        self.inplace, self.inplace_reason = None, "off (inplace_kv.ENABLED is False)"
        # weights: a session_weights.ArtifactWeights, the weights file mapped once for every session of the artifact
        self.weights = weights
        if inplace_kv.ENABLED:  # inplace_kv.py: a dense step appends by ScatterElements into capacity buffers
            proto, self.inplace_reason = _inplace_graph(model_path, providers, state_names, records, decode, seq_dims,
                                                        io_binding, state_kinds, prompt_capacity, growth)
            if proto is not None:
                self.session = _proto_session(proto, model_path, providers, session_options, weights=weights,
                                              prompt_only=bool(decode))
                _check_names(self.session, model_path, [*input_names, inplace_kv.WRITE_INDEX], output_names)
                self.inplace = inplace_kv.Buffers(seq_dims, state_kinds)
        if self.inplace is None:
            self.session = _session(model_path, input_names, output_names, providers, session_options, weights=weights,
                                    prompt_only=bool(decode))
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.extras = dict(extras or {})
        self.state_names = list(state_names) if state_names is not None else \
            [n[:-len("_next")] for n in output_names[1:] if n.endswith("_next")]
        self.records = list(records)
        self.seq_dims = list(seq_dims) if seq_dims is not None else None
        # states whose next shape is not "grows by T" (page summaries: one row per page): ORT allocates them
        self.unshaped = {n for n, k in zip(self.state_names, state_kinds or ()) if k == "summary"}
        # states evicted in model.onnx (prompt_slots.py): next width min(S + T, c), not S + T (None: data dependent)
        self.prompt_capacity = dict(prompt_capacity or {})
        # slots a state gains per new token when not 1: a packed per-head cache (evict(score='kvzip')) appends Hk
        self.growth = dict(growth or {})
        self.io_binding = io_binding and "CUDAExecutionProvider" not in self.session.get_providers()
        self.decode = None
        if decode:  # {"model_file", "outputs", "runtime_ops", "capacity"}; model_file resolved by the caller
            if self.seq_dims is None:
                raise GraphwrightError("a decode graph needs the state's seq dims (from_metadata passes them)")
            host = list(decode.get("host_inputs") or ())  # inputs drawn here per step (decode_policies.keyformer_noise)
            inputs = [*input_names, *(r["input"] for r in host)]
            proto, idx, why = _inplace_decode(decode, providers, state_names, _cpu_binding(io_binding, providers),
                                              host, seq_dims, state_kinds)
            if proto is not None:  # inplace_kv.rewrite_decode: the appended states written in place
                session = _proto_session(proto, decode["path"], providers, session_options, prompt=False, weights=weights)
                _check_names(session, decode["path"], [*inputs, inplace_kv.WRITE_INDEX], decode["outputs"])
                inplace = (idx, inplace_kv.Buffers([seq_dims[i] for i in idx], [state_kinds[i] for i in idx]))
            else:
                session, inplace = _session(decode["path"], inputs, decode["outputs"], providers, session_options,
                                            prompt=False, weights=weights), None
            alias = _slot_aliases(decode, state_names, state_kinds) if _cpu_binding(io_binding, providers) else []
            self.decode = {"session": session, "outputs": list(decode["outputs"]), "alias": alias,
                           "alias_index": [i for i, n in enumerate(state_names or ()) if n in set(alias)],
                           "records": list(decode.get("runtime_ops") or ()), "capacity": dict(decode["capacity"]),
                           "host_inputs": host, "inputs": inputs, "inplace": inplace, "inplace_reason": why,
                           "exported": lambda: _session(decode["path"], inputs, decode["outputs"], providers, session_options,
                                                        prompt=False, weights=weights)}

    @classmethod
    def from_metadata(cls, model_path, meta: dict, providers=None, session_options=None, io_binding=True,
                      weights=None) -> "OnnxStep":
        decode = meta.get("decode")
        decode = decode if decode and decode.get("model_file") else None
        if decode:
            decode = {**decode, "path": Path(model_path).parent / decode["model_file"]}
            if not decode["path"].is_file():
                raise GraphwrightError(f"{Path(model_path).parent}: missing {decode['model_file']} (the decode graph); re-export the model")
        step = cls(model_path, meta["inputs"], meta["outputs"], providers, session_options,
                   state_names=[s["name"] for s in meta["state"]], records=meta.get("runtime_ops") or (),
                   extras={x["name"]: x["kind"] for x in meta.get("extra_inputs") or ()}, decode=decode,
                   seq_dims=[int(s["seq_dim"]) for s in meta["state"]], io_binding=io_binding,
                   state_kinds=[s.get("kind") for s in meta["state"]],
                   prompt_capacity=(meta.get("prompt") or {}).get("capacity"), growth=packed_growth(meta), weights=weights)
        from .metadata_schema import check_state_inputs

        check_state_inputs(step.session, meta["state"], model_path)
        return step

    # the runtime's generate loop may donate its state (``inplace_slots.py``): ``donate_state=True`` lets a decode step
    # write the capacity K/V states in place
    takes_donated_state = True

    def __call__(self, input_ids, positions, logits_index, state, donate_state: bool = False, **extras):
        unknown = set(extras) - set(self.extras)
        if unknown:
            raise GraphwrightError(f"unknown extra input(s) {sorted(unknown)}; this model takes {sorted(self.extras) or 'none'}")
        B = input_ids.shape[0]
        extra = [extras[n] if extras.get(n) is not None else torch.zeros(B, 1) for n in self.extras]
        if self.inplace is not None:
            return self._run_inplace(input_ids, positions, logits_index, state, extra)
        session, outputs, records, capacity, host, names = self.session, self.output_names, self.records, {}, [], self.input_names
        if self.decode is not None and input_ids.shape[1] == 1:
            from .decode_policies import keyformer_noise
            from .decode_slots import pad_to_capacity

            d = self.decode
            session, outputs, records, capacity = d["session"], d["outputs"], d["records"], d["capacity"]
            state = pad_to_capacity(list(state), self.state_names, self.seq_dims, capacity)
            if d["inplace"] is not None and _one_width(state, d["inplace"][0], self.seq_dims, d):
                return self._run_decode_inplace(d, input_ids, positions, logits_index, state, extra)
            session = d["session"]
            host, names = [keyformer_noise(r, state, self.state_names, int(r["heads"])) for r in d["host_inputs"]], d["inputs"]
        tensors = [t.detach().cpu().contiguous() for t in (input_ids, positions, logits_index, *state, *extra, *host)]
        if self.io_binding and not records and self.seq_dims is not None and all(t.dtype in NUMPY for t in tensors):
            alias = None
            if donate_state and capacity and self.decode["alias_index"]:  # inplace_slots.py: rows written into the state
                alias = {self.state_names[i]: tensors[3 + i] for i in self.decode["alias_index"]}
            out = self._run_bound(session, outputs, tensors, capacity, self.prompt_capacity if session is self.session else {},
                                  names, alias)
        else:
            res = session.run(None, {name: t.numpy() for name, t in zip(names, tensors)})
            out = dict(zip(outputs, (torch.from_numpy(o) for o in res)))
        if records:
            from .split import run_records

            ins = dict(zip(names, tensors))
            out.update({f"{k}_next": v for k, v in run_records(records, out, ins).items()})
        return _to_caller([out["logits"], *(out[f"{n}_next"] for n in self.state_names)], input_ids)

    def _run_bound(self, session, outputs, tensors, capacity, bounded=None, input_names=None, alias=None) -> dict:
        """One ``run_with_iobinding``: inputs and outputs bound to torch tensors' memory (module docstring).
        ``alias``: {state name: tensor} outputs bound to that tensor (its own input buffer, ``inplace_kv``)."""
        T = tensors[0].shape[1]
        state = tensors[3:3 + len(self.state_names)]
        binding = session.io_binding()
        bind_in, bind_out = _binders(binding)
        for name, t in zip(input_names or self.input_names, tensors):
            bind_in(name, NUMPY[t.dtype], list(t.shape), t.data_ptr())
        logits_dtype = self.__dict__.setdefault("_logits_dtype", _ort_dtype(session.get_outputs()[0].type))
        out = {"logits": torch.empty(tensors[0].shape[0], tensors[2].shape[0], self._vocab(session), dtype=logits_dtype)}
        bounded = bounded or {}
        for name, t, dim in zip(self.state_names, state, self.seq_dims):
            if alias and name in alias:
                out[f"{name}_next"] = alias[name]
                continue
            if name in self.unshaped or (name in bounded and bounded[name] is None):
                continue  # ORT allocates (a page summary; a prompt step's data-dependent kept width)
            shape = list(t.shape)
            if name not in capacity:
                shape[dim] += T * self.growth.get(name, 1)
            if bounded.get(name) is not None:
                shape[dim] = min(shape[dim], bounded[name])
            out[f"{name}_next"] = torch.empty(shape, dtype=t.dtype)
        for name in outputs:
            t = out.get(name)
            if t is None:  # shape known only to ORT: it allocates, we take the OrtValue after the run
                binding.bind_output(name, "cpu")
            else:
                bind_out(name, NUMPY[t.dtype], list(t.shape), t.data_ptr())
        session.run_with_iobinding(binding)
        if len(out) < len(outputs):
            for name, value in zip(outputs, binding.get_outputs()):
                if name not in out:
                    out[name] = torch.from_numpy(value.numpy())
        return out

    def _run_decode_inplace(self, d, input_ids, positions, logits_index, state, extra):
        """A decode step whose appended states are capacity buffers (``inplace_kv.rewrite_decode``): each bound to
        its own input's memory (its row written in place), the capacity states as in ``_run_bound``."""
        idx, bufs = d["inplace"]
        buffers, L = bufs.prepare([state[i].detach().cpu() for i in idx], 1)
        state = list(state)
        for i, b in zip(idx, buffers):
            state[i] = b
        tensors = [t.detach().cpu().contiguous() for t in (input_ids, positions, logits_index, *state, *extra)]
        tensors.append(torch.tensor([L], dtype=torch.int64))
        alias = {self.state_names[i]: b for i, b in zip(idx, buffers)}
        out = self._run_bound(d["session"], d["outputs"], tensors, d["capacity"], None,
                              [*d["inputs"], inplace_kv.WRITE_INDEX], alias)
        for i, v in zip(idx, bufs.views(buffers, L + 1)):
            out[f"{self.state_names[i]}_next"] = v
        return _to_caller([out["logits"], *(out[f"{n}_next"] for n in self.state_names)], input_ids)

    def _run_inplace(self, input_ids, positions, logits_index, state, extra):
        """One step on capacity buffers (``inplace_kv.py``): each state output bound to its own input's memory,
        so the T new rows are written in place; returns views of the first L + T slots."""
        T = input_ids.shape[1]
        buffers, L = self.inplace.prepare([t.detach().cpu() for t in state], T)
        head = [t.detach().cpu().contiguous() for t in (input_ids, positions, logits_index)]
        tail = [t.detach().cpu().contiguous() for t in extra] + [torch.tensor([L], dtype=torch.int64)]
        binding = self.session.io_binding()
        bind_in, bind_out = _binders(binding)
        for name, t in zip([*self.input_names, inplace_kv.WRITE_INDEX], [*head, *buffers, *tail]):
            bind_in(name, NUMPY[t.dtype], list(t.shape), t.data_ptr())
        logits_dtype = self.__dict__.setdefault("_logits_dtype", _ort_dtype(self.session.get_outputs()[0].type))
        logits = torch.empty(input_ids.shape[0], logits_index.shape[0], self._vocab(self.session), dtype=logits_dtype)
        bind_out("logits", NUMPY[logits.dtype], list(logits.shape), logits.data_ptr())
        for name, t in zip(self.state_names, buffers):
            bind_out(f"{name}_next", NUMPY[t.dtype], list(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)
        return _to_caller([logits, *self.inplace.views(buffers, L + T)], input_ids)

    def _vocab(self, session) -> int:
        dim = session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            raise GraphwrightError(f"logits output has a symbolic vocabulary dim {dim!r}; pass io_binding=False")
        return dim


def packed_growth(meta: dict) -> dict:
    """{state name: Hk} for the packed per-head caches of ``graphwright.json["kvzip"]`` (k, v and positions of a
    layer: a step of T tokens appends Hk x T slots, ``packed_rewrite.py``'s head-major layout)."""
    shapes = {s["name"]: s["shape"] for s in meta["state"]}
    out = {}
    for row in (meta.get("kvzip") or {}).get("layers") or ():
        hk = int(shapes[row[3]][1])  # the positions state [B, Hk, N]
        out.update({name: hk for name in row[1:]})
    return out


NUMPY = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool",
         torch.float64: "float64", torch.int8: "int8", torch.uint8: "uint8"}  # int8: FastGen's token classes; uint8: Scissorhands' ring


FAST_BIND = True  # False: the public IOBinding methods (A/B in bench/profile_onnx_decode.py --bind-ab)
_CPU_DEVICE: list = []


def _binders(binding):
    """(bind_input, bind_output)(name, element type, shape, pointer) for CPU memory.

    ``IOBinding.bind_input``/``bind_output`` build a new ``OrtDevice`` (a Python object, a device-type
    lookup) on every call; a decode step binds every state twice (SmolLM2-135M with H2O: ~250 calls per
    step), so the per-call Python cost showed in cProfile as more than the bindings themselves. Here the
    C binding is called directly with one cached CPU device: the same arguments reach the same C++ method.
    Falls back to the public methods when that attribute is missing (another onnxruntime version)."""
    c = getattr(binding, "_iobinding", None)
    if not FAST_BIND or c is None:
        return (lambda n, e, s, p: binding.bind_input(n, "cpu", 0, e, s, p),
                lambda n, e, s, p: binding.bind_output(n, "cpu", 0, e, s, p))
    if not _CPU_DEVICE:
        from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

        _CPU_DEVICE.append(OrtDevice.make("cpu", 0)._get_c_device())
    dev = _CPU_DEVICE[0]
    return (lambda n, e, s, p: c.bind_input(n, dev, e, s, p), lambda n, e, s, p: c.bind_output(n, dev, e, s, p))


def _ort_dtype(type_str: str) -> torch.dtype:
    """ORT's ``tensor(float)`` -> torch dtype."""
    names = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}
    if type_str not in names:
        raise GraphwrightError(f"logits of type {type_str} cannot be bound; pass io_binding=False")
    return names[type_str]


def _inplace_graph(model_path, providers, state_names, records, decode, seq_dims, io_binding, state_kinds, prompt_capacity,
                   growth=None):
    """``(ModelProto, None)``: the in-place rewrite of a dense step graph (``inplace_kv.rewrite``), or ``(None, reason)``."""
    if decode or records or prompt_capacity:
        return None, "the artifact has a decode graph, runtime ops or prompt eviction (not a dense append)"
    if growth:
        return None, "a packed per-head cache appends Hk slots per token (not a dense append)"
    if not io_binding or "CUDAExecutionProvider" in (providers or default_providers()):
        return None, "needs CPU I/O binding"
    if state_names is None or seq_dims is None or state_kinds is None:
        return None, "state names, kinds and seq dims unknown (from_metadata passes them)"
    return inplace_kv.rewrite(model_path, list(state_names), list(state_kinds), list(seq_dims))


def _to_caller(res: list, input_ids):
    """(logits, [next states]) on the caller's device (the session ran on CPU tensors)."""
    if input_ids.device.type != "cpu":
        res = [o.to(input_ids.device) for o in res]
    return res[0], res[1:]


def _cpu_binding(io_binding: bool, providers) -> bool:
    return bool(io_binding) and "CUDAExecutionProvider" not in (providers or default_providers())


def _one_width(state, idx, seq_dims, d) -> bool:
    """Whether the in-place states share one width (one ``kv_write_index``). When they do not (no recipe is known to
    do this: each grows by one row per step from the prompt step's width), the decode graph as exported replaces
    the in-place one for good, with the reason in ``inplace_reason``."""
    widths = {state[i].shape[seq_dims[i]] for i in idx}
    if len(widths) == 1:
        return True
    d["session"], d["inplace"] = d["exported"](), None
    d["inplace_reason"] = f"appended states of different widths {sorted(widths)[:4]}: the exported decode graph runs"
    return False


def _slot_aliases(decode, state_names, state_kinds) -> list:
    """The decode graph's capacity K/V states a donated step writes in place (``inplace_slots.aliasable``)."""
    if not inplace_slots.ENABLED or state_names is None or state_kinds is None or decode.get("runtime_ops"):
        return []
    import onnx

    graph = onnx.load(str(decode["path"]), load_external_data=False).graph
    return inplace_slots.aliasable(graph, dict(decode["capacity"]), dict(zip(state_names, state_kinds)))


def _inplace_decode(decode, providers, state_names, io_binding, host, seq_dims, state_kinds):
    """``(ModelProto, state indices, None)``: the decode graph with its appended states written in place
    (``inplace_kv.rewrite_decode``), or ``(None, None, reason)``."""
    if not (inplace_kv.ENABLED and inplace_kv.DECODE):
        return None, None, "off (inplace_kv.ENABLED / DECODE is False)"
    if decode.get("runtime_ops") or host or not io_binding:
        return None, None, "the decode graph has runtime ops or host inputs, or no CPU I/O binding"
    if state_names is None or seq_dims is None or state_kinds is None:
        return None, None, "state names, kinds and seq dims unknown (from_metadata passes them)"
    return inplace_kv.rewrite_decode(decode["path"], list(state_names), list(state_kinds), list(seq_dims),
                                     dict(decode["capacity"]))


def _session(model_path, input_names, output_names, providers, session_options, prompt: bool = True, weights=None,
             prompt_only: bool = False):
    """An InferenceSession whose inputs/outputs are the ones ``graphwright.json`` lists; ``prompt``: the graph runs
    prompt steps too (``model.onnx``; ``decode.onnx`` runs single-token steps only); ``weights``: the artifact's mapped
    weights (``session_weights.py``); ``prompt_only``: the graph runs no one-token steps (an artifact's ``model.onnx``
    beside a ``decode.onnx``)."""
    import onnxruntime as ort

    session = None
    if decode_attention.ENABLED or prompt_attention.ENABLED or packed_decode.ENABLED or weights is not None:  # the graph alone is rewritten
        import onnx

        proto = onnx.load(str(model_path), load_external_data=False)
        if _load_rewrites(proto, prompt, prompt_only) or weights is not None:
            session = inplace_kv.session(proto, model_path, providers or default_providers(), session_options, weights)
    if session is None:
        session = ort.InferenceSession(str(model_path), sess_options=session_options,
                                       providers=providers or default_providers())
    _check_names(session, model_path, input_names, output_names)
    return session


def _proto_session(proto, model_path, providers, session_options, prompt: bool = True, weights=None,
                   prompt_only: bool = False):
    """A session of a graph rewritten at load time (``inplace_kv``), its one-row attention grouped too
    (``decode_attention``); the weights are read from ``model_path``'s folder, or mapped once (``weights``)."""
    _load_rewrites(proto, prompt, prompt_only)
    return inplace_kv.session(proto, model_path, providers or default_providers(), session_options, weights)


def _load_rewrites(proto, prompt: bool = True, prompt_only: bool = False) -> int:
    """The load-time rewrites of ``proto`` (in place): one query row as grouped MatMuls (``decode_attention``),
    a long prompt step in query blocks (``prompt_attention``; only a graph that runs prompt steps, ``prompt``), each
    layer's state written before the next layer's attention (``state_order``), and the MLP of a long prompt step in row
    blocks (``prompt_rows``; only a graph that runs no one-token steps, ``prompt_only``); then a packed Ada-KV cache's
    one-row step over its packed buffer (``packed_decode``; a graph that runs one-token steps). Returns how many nodes
    changed."""
    packed = [] if prompt_only else packed_decode.find(proto)  # named before the rewrites below move the Attention
    count = prompt_attention.rewrite(proto) if prompt and prompt_attention.ENABLED else 0  # takes the T = 1 branch too
    if count and state_order.ENABLED:  # each layer's state written before the next layer's attention
        state_order.rewrite(proto, prompt_attention.anchors(proto))
    if prompt_only and prompt_rows.ENABLED:  # the MLP of a long prompt step in row blocks
        count += prompt_rows.rewrite(proto)
    count += decode_attention.rewrite(proto) if decode_attention.ENABLED else 0
    return count + packed_decode.rewrite(proto, packed)  # a packed cache's one-row step reads the packed buffer


def _check_names(session, model_path, input_names, output_names) -> None:
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != list(input_names) or got_out != list(output_names):
        raise GraphwrightError(f"{model_path}: graph inputs/outputs {got_in} -> {got_out} do not match "
                               f"{METADATA} ({list(input_names)} -> {list(output_names)})")


def read_metadata(path) -> dict:
    """The artifact's ``graphwright.json``, parsed with bounded size and nesting (``models/json_files.py``)
    and checked against the schema (``metadata_schema.py``); ``GraphwrightError`` naming the field otherwise."""
    from ...models.json_files import read_json
    from .metadata_schema import validate

    path = Path(path)
    meta_path = path / METADATA
    if not path.is_dir():
        raise GraphwrightError(f"{path}: not a directory (expected a graphwright ONNX export with {MODEL} and {METADATA})")
    if not meta_path.is_file():
        raise GraphwrightError(f"{path}: missing {METADATA}; not a graphwright ONNX export (run graphwright.export_onnx first)")
    meta = read_json(meta_path, "metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise GraphwrightError(f"{meta_path}: not graphwright export metadata (format {str(got)[:80]!r}, expected {FORMAT!r})")
    return validate(meta, path)
