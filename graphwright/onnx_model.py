"""``graphwright.load(dir)``: run an exported artifact with ONNX Runtime through the shared loop.

The session is wrapped as a step function ``(input_ids, positions, logits_index, state) ->
(logits, state)`` and handed to ``Runtime``, the same prefill/decode loop the torch backend
uses, so padding, stopping, sampling and KV accounting cannot drift between backends.
On CPU each step binds its inputs and outputs to torch tensors' memory (ORT I/O binding, see
``codegen/onnx/artifact.py``), so ORT writes the next state into the tensors the loop feeds back;
``io_binding=False`` (or a step with runtime ops) crosses as numpy arrays sharing memory with
torch tensors. An export with a decode graph (in-graph eviction, ``codegen/onnx/decode_slots.py``)
runs prompt steps on ``model.onnx`` and single-token steps on ``decode.onnx``. An export of
``evict(block=N)`` (``graphwright.json["prefill_chunk"]``) runs a prompt as steps of N tokens, as the torch runtime does.
An export of ``evict(score="kvzip")`` runs its replay graph after a prompt step (``runtime/kvzip_onnx.py``), as the
torch runtime runs its replay; a Finch export refuses a reusable context, as ``CompiledModel`` does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .codegen.onnx.artifact import OnnxStep, info_from_json, read_metadata, spec_from_json
from .codegen.onnx.manifest import check_files
from .errors import GraphwrightError
from .runtime.generate import Runtime

PROMPT_CHUNK = 512  # tokens per prompt step when the artifact allows chunking (``prompt_chunking``)


def prompt_chunking(meta: dict, step: OnnxStep, asked="auto"):
    """``(chunk or None, why)``: how many prompt tokens one ``model.onnx`` run takes.

    ONNX Runtime's CPU ``Attention`` (opset 23) computes the whole [T, S] score matrix and then adds the causal
    mask, so a T-token prompt pays for T x T scores where a causal kernel pays for half, and holds the matrix
    (T = 4,096: 64 MiB per head). Run as steps of N tokens over the growing cache, the prompt pays T x T / 2 + T x N / 2
    and holds N x S scores per head; every query row still sees exactly the keys at positions <= its own, so the
    logits and the cache are the same (tested: tiny Llama, left-padded batch). Measured on SmolLM2-135M, quiet, 2
    threads, a 4,096-token prompt of the novel: 15.0 s as one step, 11.0 s in steps of 512 (identical logits;
    ``bench/bench_onnx_prompt_chunk.py``, the README's ONNX section). Chunking is only exact when a prompt step
    appends to a dense cache and nothing else: an artifact that evicts in its prompt step (its kept set depends on
    the whole prompt's scores), one with runtime ops, extra inputs (steering) or a GemFilter selection keeps one
    prompt step (``"auto"``) and refuses an explicit chunk."""
    fixed = meta.get("prefill_chunk")  # evict(block=N): the export's own blocks
    if fixed is not None:
        if asked not in ("auto", None, fixed):
            raise GraphwrightError(f"this artifact runs its prompt in blocks of {fixed} (evict(block={fixed})); "
                                   f"prompt_chunk={asked!r} would change its kept sets; leave prompt_chunk out")
        return fixed, f"evict(block={fixed}) blocks"
    if asked is None:
        return None, "one prompt step (prompt_chunk=None)"
    if asked != "auto" and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 2):
        raise GraphwrightError(f"prompt_chunk must be 'auto', None or an int >= 2; got {asked!r}")
    why = None
    if step.inplace is None:
        why = f"the prompt step is not a dense append ({step.inplace_reason})"
    elif step.extras:
        why = f"the graph takes extra inputs {sorted(step.extras)} (one prompt step feeds them)"
    elif meta.get("gemfilter"):
        why = "GemFilter selects the prompt's tokens first"
    if why is not None:
        if asked != "auto":
            raise GraphwrightError(f"prompt_chunk={asked} is not exact for this artifact: {why}")
        return None, f"one prompt step: {why}"
    chunk = PROMPT_CHUNK if asked == "auto" else asked
    return chunk, f"prompt steps of {chunk} tokens over the dense cache"


class OnnxModel:
    """An exported graphwright model run by ONNX Runtime: same ``generate``/``logits``/``last_stats`` as CompiledModel."""

    def __init__(self, path, providers=None, session_options=None, io_binding: bool = True,
                 verify_hashes: bool = True, allow_unverified: bool = False, prompt_chunk="auto", share_weights=None):
        """``share_weights``: see ``load``. ``prompt_chunk``: run a prompt as steps of at most N tokens. ``"auto"`` (default): ``PROMPT_CHUNK`` for an
        artifact whose prompt step only appends to a dense cache (``prompt_chunking``), else one step; an int >= 2 or
        None (one step) to choose; an ``evict(block=N)`` export always runs its own blocks."""
        self.path = Path(path)
        self.metadata = read_metadata(self.path)  # size, nesting and schema checked (metadata_schema.py)
        meta = self.metadata
        _check_verified(self.path, meta, allow_unverified)
        if verify_hashes:
            check_files(self.path, meta)
        model_path = self.path / meta["model_file"]
        if not model_path.is_file():
            raise GraphwrightError(f"{self.path}: missing {meta['model_file']} (the ONNX graph); re-export the model")
        self.info = info_from_json(meta["model_info"])
        self.state_specs = [spec_from_json(s) for s in meta["state"]]
        self.recipe = meta.get("recipe")
        self.weights = _shared_weights(self.path, meta, share_weights)
        try:
            self.step = OnnxStep.from_metadata(model_path, meta, providers, session_options, io_binding=io_binding,
                                               weights=self.weights)
        except GraphwrightError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for corrupt files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphwrightError(f"{model_path}: ONNX Runtime cannot load the model ({type(exc).__name__}: {first}); "
                                   "the file is corrupt or incomplete, re-export the model") from exc
        self.tokenizer = self._load_tokenizer()
        self.prompt_chunk, self.prompt_chunk_reason = prompt_chunking(meta, self.step, prompt_chunk)
        self._runtime = Runtime(self.step, self.state_specs, self.info, max_positions=self._position_limit(),
                                recipe=self.recipe, prefill_chunk=self.prompt_chunk)
        self._select = None
        if meta.get("gemfilter"):  # GemFilter: the exported selection graph runs before generation
            from .codegen.onnx.gemfilter_export import OnnxSelection

            if not (self.path / meta["gemfilter"]["model_file"]).is_file():
                raise GraphwrightError(f"{self.path}: missing {meta['gemfilter']['model_file']} (the GemFilter "
                                       "selection graph); re-export the model")
            self._select = OnnxSelection(self.path, meta["gemfilter"], self.state_specs, providers, session_options,
                                         weights=self.weights)
        if meta.get("kvzip"):  # evict(score='kvzip'): the exported replay graph scores the cache after a prompt step
            from .runtime.kvzip_onnx import OnnxKVzipReplay

            if not (self.path / meta["kvzip"]["model_file"]).is_file():
                raise GraphwrightError(f"{self.path}: missing {meta['kvzip']['model_file']} (the KVzip replay graph); "
                                       "re-export the model")
            self._runtime.after_prompt = OnnxKVzipReplay(self.path, meta["kvzip"], self.state_specs, providers,
                                                         session_options, weights=self.weights)

    def _position_limit(self):
        """``max_positions``, or None for a streaming export whose attention sees cache indices only (``runtime.inputs``)."""
        from .errors import RecipeError
        from .recipes import Recipe
        from .runtime.inputs import position_limit

        try:
            entries = Recipe.parse(self.recipe).to_list() if isinstance(self.recipe, str) else None
        except RecipeError:
            entries = None  # an unreadable recipe string keeps the model's own limit
        return position_limit(self.info, entries)

    def _load_tokenizer(self):
        tok_dir = self.metadata.get("tokenizer")
        if not tok_dir or not (self.path / tok_dir).is_dir():
            return None
        from transformers import AutoTokenizer

        try:  # never the folder's own code: an auto_map in tokenizer_config.json is not followed
            return AutoTokenizer.from_pretrained(str(self.path / tok_dir), trust_remote_code=False, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/OSError/... for unusable tokenizers
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise GraphwrightError(f"{self.path / tok_dir}: cannot load the tokenizer without running code from the "
                                   f"folder ({type(exc).__name__}: {first}); re-export the model") from exc

    @property
    def providers(self) -> list:
        return self.step.session.get_providers()

    @property
    def last_stats(self) -> dict:
        return self._runtime.last_stats

    def prefill(self, input_ids, attention_mask=None, allow_long: bool = False):
        """Like ``CompiledModel.prefill``: a reusable (compressed) context for ``generate(..., context=ctx)``."""
        if self._select is not None:
            raise ValueError("gemfilter selects prompt tokens with the question in view; a reusable context cannot be made with it")
        self._refuse_finch_context()
        return self._runtime.prefill(input_ids, attention_mask, allow_long=allow_long, recipe=self.recipe)

    def generate(self, input_ids, max_new_tokens: int = 32, emphasis=None, **kwargs) -> torch.Tensor:
        """Like ``CompiledModel.generate``; ``emphasis`` (steered exports): token spans per row."""
        extras = self._extras(emphasis, input_ids, kwargs.get("attention_mask"))
        if self._select is not None:
            if kwargs.get("context") is not None:
                raise ValueError("gemfilter selects prompt tokens with the question in view; a reusable context cannot be made with it")
            if emphasis is not None:
                raise ValueError("emphasis spans index the full prompt; they cannot be combined with gemfilter")
            from .runtime.gemfilter import filtered_generate

            return filtered_generate(self._runtime, self.info, self._select, input_ids, max_new_tokens, **kwargs)
        if kwargs.get("context") is not None:
            self._refuse_finch_context()
        return self._runtime.generate(input_ids, max_new_tokens=max_new_tokens, extras=extras, **kwargs)

    def _refuse_finch_context(self) -> None:
        """As ``CompiledModel``: Finch scores with the question (its window), which a reusable context lacks."""
        from .errors import RecipeError
        from .recipes import Recipe

        try:
            entries = Recipe.parse(self.recipe).to_list() if isinstance(self.recipe, str) else []
        except RecipeError:
            entries = []
        if any(e.get("pass") == "evict" and e.get("score") == "finch" for e in entries):
            from .ops.scorers.finch import CONTEXT_REFUSAL

            raise ValueError(CONTEXT_REFUSAL)

    def logits(self, input_ids, attention_mask=None, emphasis=None, allow_long: bool = False) -> torch.Tensor:
        return self._runtime.logits(input_ids, attention_mask, extras=self._extras(emphasis, input_ids, attention_mask),
                                    allow_long=allow_long)

    def _extras(self, emphasis, input_ids, attention_mask) -> dict:
        if emphasis is None:
            return {}
        from types import SimpleNamespace

        from .capture.step_graph import ExtraInput
        from .runtime.generate import check_prompt
        from .steer.emphasis import steer_extras

        input_ids, attention_mask = check_prompt(input_ids, attention_mask, self.info.vocab_size)  # before spans read the mask

        specs = [ExtraInput(x["name"], x["kind"], x.get("doc", ""), dict(x.get("meta") or {}))
                 for x in self.metadata.get("extra_inputs") or ()]
        return steer_extras(SimpleNamespace(extra_inputs=specs), emphasis, input_ids, attention_mask)

    def report(self):
        """The compile-time per-layer report stored in the export, with this runtime's last stats."""
        from .inspect.report import BASE_COLUMNS, Report

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


def _check_verified(path: Path, meta: dict, allow_unverified: bool) -> None:
    ver = meta.get("verification")
    if isinstance(ver, dict) and ver.get("passed") is False and not allow_unverified:
        why = str(ver.get("error") or "no reason recorded").splitlines()[0][:300]
        raise GraphwrightError(f"{path}: this artifact failed its export verification ({why}); its outputs may be wrong. "
                               "Re-export it, or pass allow_unverified=True to load it anyway")


def _shared_weights(path: Path, meta: dict, asked):
    """The artifact's mapped weights (``codegen/onnx/session_weights.py``) when sharing is asked for (``asked``, or
    ``session_weights.ENABLED`` when None) and the artifact runs more than one graph; else None."""
    from .codegen.onnx import session_weights

    if asked not in (None, True, False):
        raise GraphwrightError(f"share_weights must be True, False or None (the default: session_weights.ENABLED); got {asked!r}")
    share = session_weights.ENABLED if asked is None else asked
    graphs = 1 + sum(bool((meta.get(k) or {}).get("model_file")) for k in ("decode", "gemfilter", "kvzip"))
    return session_weights.ArtifactWeights(path) if share and graphs > 1 else None


def load(path, providers=None, session_options=None, io_binding: bool = True, verify_hashes: bool = True,
         allow_unverified: bool = False, prompt_chunk="auto", share_weights=None) -> OnnxModel:
    """Load a directory written by ``graphwright.export_onnx``; raises ``GraphwrightError`` on a missing,
    corrupt, changed or failed artifact.

    The folder is untrusted input: ``graphwright.json`` is checked against its schema
    (``codegen/onnx/metadata_schema.py``: types, ranges, paths inside the folder), and the tokenizer
    loads with ``trust_remote_code=False``. ``verify_hashes``: hash every file the export recorded
    and refuse a changed, missing or unrecorded one (``codegen/onnx/manifest.py``; streaming sha256,
    a cost proportional to the weights' size); False skips it (for artifacts exported before hashes
    were recorded, or a folder you trust). ``allow_unverified``: load an artifact whose export
    verification failed (``verification.passed`` false), refused by default.
    ``io_binding``: bind each step's inputs and outputs to torch tensors' memory (``codegen/onnx/artifact.py``);
    False runs ``session.run`` with numpy arrays (the path before I/O binding). ``prompt_chunk``: prompt tokens per
    ``model.onnx`` run (``prompt_chunking``: by default 512 where that is exact, else one step). ``share_weights``: an
    artifact that runs more than one graph (an evicting recipe's ``decode.onnx``, GemFilter's selection, KVzip's
    replay) maps its weights file once for all of their sessions instead of one copy each (``codegen/onnx/
    session_weights.py``): ~420 MB lower peak for SmolLM2-135M at 8k, decode steps ~13% slower (MatMul weights not prepacked);
    None: ``session_weights.ENABLED`` (off)."""
    return OnnxModel(path, providers=providers, session_options=session_options, io_binding=io_binding,
                     verify_hashes=verify_hashes, allow_unverified=allow_unverified, prompt_chunk=prompt_chunk,
                     share_weights=share_weights)
