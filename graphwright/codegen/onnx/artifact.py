"""The ONNX artifact's format and its step function: ``graphwright.json`` I/O and ``OnnxStep``.

``OnnxStep`` is to an exported artifact what ``lower()``'s GraphModule is to the torch backends:
a step function ``(input_ids, positions, logits_index, state) -> (logits, state)`` that the
runtime's prefill/decode loop drives (``graphwright.load`` wraps it in ``OnnxModel``). It lives in
codegen so export can verify its own output without importing the runtime layer above it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...capture.step_graph import ModelInfo, StateSpec
from ...errors import GraphwrightError

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
                 state_names=None, records=(), extras=None):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_path), sess_options=session_options,
                                            providers=providers or default_providers())
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != list(input_names) or got_out != list(output_names):
            raise GraphwrightError(f"{model_path}: graph inputs/outputs {got_in} -> {got_out} do not match "
                                   f"{METADATA} ({list(input_names)} -> {list(output_names)})")
        self.input_names = got_in
        self.output_names = got_out
        self.extras = dict(extras or {})
        self.state_names = list(state_names) if state_names is not None else \
            [n[:-len("_next")] for n in got_out[1:] if n.endswith("_next")]
        self.records = list(records)

    @classmethod
    def from_metadata(cls, model_path, meta: dict, providers=None, session_options=None) -> "OnnxStep":
        return cls(model_path, meta["inputs"], meta["outputs"], providers, session_options,
                   state_names=[s["name"] for s in meta["state"]], records=meta.get("runtime_ops") or (),
                   extras={x["name"]: x["kind"] for x in meta.get("extra_inputs") or ()})

    def __call__(self, input_ids, positions, logits_index, state, **extras):
        unknown = set(extras) - set(self.extras)
        if unknown:
            raise GraphwrightError(f"unknown extra input(s) {sorted(unknown)}; this model takes {sorted(self.extras) or 'none'}")
        B = input_ids.shape[0]
        extra = [extras[n] if extras.get(n) is not None else torch.zeros(B, 1) for n in self.extras]
        tensors = (input_ids, positions, logits_index, *state, *extra)
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, tensors)}
        out = self.session.run(None, feeds)
        out = dict(zip(self.output_names, (torch.from_numpy(o) for o in out)))
        if self.records:
            from .split import run_records

            ins = dict(zip(self.input_names, tensors))
            out.update({f"{k}_next": v for k, v in run_records(self.records, out, ins).items()})
        res = [out["logits"], *(out[f"{n}_next"] for n in self.state_names)]
        if input_ids.device.type != "cpu":
            res = [o.to(input_ids.device) for o in res]
        return res[0], res[1:]


def read_metadata(path) -> dict:
    path = Path(path)
    meta_path = path / METADATA
    if not path.is_dir():
        raise GraphwrightError(f"{path}: not a directory (expected a graphwright ONNX export with {MODEL} and {METADATA})")
    if not meta_path.is_file():
        raise GraphwrightError(f"{path}: missing {METADATA}; not a graphwright ONNX export (run graphwright.export_onnx first)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GraphwrightError(f"{meta_path}: corrupt metadata ({exc}); re-export the model") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise GraphwrightError(f"{meta_path}: not graphwright export metadata (format {got!r}, expected {FORMAT!r})")
    missing = [k for k in ("inputs", "outputs", "state", "model_info", "model_file") if k not in meta]
    if missing:
        raise GraphwrightError(f"{meta_path}: incomplete metadata, missing {missing}; re-export the model")
    return meta
