"""``graphwright.load(dir)``: run an exported artifact with ONNX Runtime through the shared loop.

The session is wrapped as a step function ``(input_ids, positions, logits_index, state) ->
(logits, state)`` and handed to ``Runtime``, the same prefill/decode loop the torch backend
uses, so padding, stopping, sampling and KV accounting cannot drift between backends.
Tensors cross the boundary as numpy arrays that share memory with torch tensors on CPU
(``Tensor.numpy()`` / ``torch.from_numpy`` copy nothing); the state an ORT step returns is fed
straight back into the next step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..capture.step_graph import ModelInfo, StateSpec
from ..errors import GraphwrightError
from .generate import Runtime

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
    for k in ("eos_token_id", "attention_modules", "moe_modules"):
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
            from ..codegen.onnx.split import run_records

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
        raise GraphwrightError(f"{meta_path}: not graphwright export metadata (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    missing = [k for k in ("inputs", "outputs", "state", "model_info", "model_file") if k not in meta]
    if missing:
        raise GraphwrightError(f"{meta_path}: incomplete metadata, missing {missing}; re-export the model")
    return meta


class OnnxModel:
    """An exported graphwright model run by ONNX Runtime: same ``generate``/``logits``/``last_stats`` as CompiledModel."""

    def __init__(self, path, providers=None, session_options=None):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        meta = self.metadata
        model_path = self.path / meta["model_file"]
        if not model_path.is_file():
            raise GraphwrightError(f"{self.path}: missing {meta['model_file']} (the ONNX graph); re-export the model")
        self.info = info_from_json(meta["model_info"])
        self.state_specs = [spec_from_json(s) for s in meta["state"]]
        self.recipe = meta.get("recipe")
        try:
            self.step = OnnxStep.from_metadata(model_path, meta, providers, session_options)
        except GraphwrightError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for corrupt files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphwrightError(f"{model_path}: ONNX Runtime cannot load the model ({type(exc).__name__}: {first}); "
                                   "the file is corrupt or incomplete, re-export the model") from exc
        self.tokenizer = self._load_tokenizer()
        self._runtime = Runtime(self.step, self.state_specs, self.info)
        self._select = None
        if meta.get("gemfilter"):  # GemFilter: the exported selection graph runs before generation
            from ..codegen.onnx.gemfilter_export import OnnxSelection

            if not (self.path / meta["gemfilter"]["model_file"]).is_file():
                raise GraphwrightError(f"{self.path}: missing {meta['gemfilter']['model_file']} (the GemFilter "
                                       "selection graph); re-export the model")
            self._select = OnnxSelection(self.path, meta["gemfilter"], self.state_specs, providers, session_options)

    def _load_tokenizer(self):
        tok_dir = self.metadata.get("tokenizer")
        if not tok_dir or not (self.path / tok_dir).is_dir():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path / tok_dir))

    @property
    def providers(self) -> list:
        return self.step.session.get_providers()

    @property
    def last_stats(self) -> dict:
        return self._runtime.last_stats

    def generate(self, input_ids, max_new_tokens: int = 32, emphasis=None, **kwargs) -> torch.Tensor:
        """Like ``CompiledModel.generate``; ``emphasis`` (steered exports): token spans per row."""
        extras = self._extras(emphasis, input_ids, kwargs.get("attention_mask"))
        if self._select is not None:
            if emphasis is not None:
                raise ValueError("emphasis spans index the full prompt; they cannot be combined with gemfilter")
            from .gemfilter import filtered_generate

            return filtered_generate(self._runtime, self.info, self._select, input_ids, max_new_tokens, **kwargs)
        return self._runtime.generate(input_ids, max_new_tokens=max_new_tokens, extras=extras, **kwargs)

    def logits(self, input_ids, attention_mask=None, emphasis=None) -> torch.Tensor:
        return self._runtime.logits(input_ids, attention_mask, extras=self._extras(emphasis, input_ids, attention_mask))

    def _extras(self, emphasis, input_ids, attention_mask) -> dict:
        if emphasis is None:
            return {}
        from types import SimpleNamespace

        from ..capture.step_graph import ExtraInput
        from ..steer.emphasis import steer_extras

        specs = [ExtraInput(x["name"], x["kind"], x.get("doc", ""), dict(x.get("meta") or {}))
                 for x in self.metadata.get("extra_inputs") or ()]
        return steer_extras(SimpleNamespace(extra_inputs=specs), emphasis, input_ids, attention_mask)

    def report(self):
        """The compile-time per-layer report stored in the export, with this runtime's last stats."""
        from ..inspect.report import BASE_COLUMNS, Report

        rep = self.metadata.get("report") or {}
        headers = dict(BASE_COLUMNS)
        summary = dict(rep.get("summary") or {})
        summary["backend"] = "onnxruntime (" + ", ".join(self.providers) + ")"
        return Report(summary=summary, rows=list(rep.get("rows") or []),
                      columns=[(k, headers.get(k, k)) for k in rep.get("columns") or []],
                      extra={"verification": dict(rep.get("verification") or {}), "last_stats": dict(self.last_stats),
                             "export": self.metadata.get("verification")})

    def __repr__(self) -> str:
        return f"OnnxModel({self.info.architecture}, recipe={self.recipe!r}, path={str(self.path)!r})"


def load(path, providers=None, session_options=None) -> OnnxModel:
    """Load a directory written by ``graphwright.export_onnx``; raises ``GraphwrightError`` on a missing or corrupt artifact."""
    return OnnxModel(path, providers=providers, session_options=session_options)
