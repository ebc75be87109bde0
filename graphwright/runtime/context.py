"""A compressed context a user keeps: prefill (and compress) a long context once, ask it many questions.

``ctx = cm.prefill(context_ids)`` runs the prompt step (where ``snapkv``/``h2o``/``streaming``/...
compress the cache, question-agnostic: the observation window is the context's own end) and
returns a :class:`Context`: the cache state, the context's attention mask and next positions, and
the logits of its last token. ``cm.generate(question_ids, context=ctx)`` copies the state (the
context is never modified, so any number of questions reuse it), feeds the question tokens one by one
as decode steps (each policy does what it does at decode: ``snapkv`` appends, ``h2o``/``streaming``
keep their budget) and then generates. Question-aware compression is the other one-argument form:
``cm.generate(torch.cat([context_ids, question_ids], 1))`` compresses with the question in the
observation window (it cannot be reused across questions, by definition).

``ctx.save(path)`` writes safetensors (tensors + a JSON header naming the model shape, recipe and
state layout); ``Context.load(path)`` reads it back without pickle, and ``generate`` refuses a context
whose layout does not match the model it is given to, naming the first difference.

Invariant tested (``tests/runtime/test_context.py``): with a lossless recipe, ``generate(q,
context=prefill(c))`` gives the tokens of ``generate(c + q)``; with an evicting one, the same as feeding
``q`` through decode steps after compressing ``c``; several questions from one context give the same
answers in any order, after a save/load round trip, in the torch runtime and in ONNX Runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "graphwright.context/1"
MAX_HEADER_BYTES = 1 << 20


def layout(specs, info, recipe) -> dict:
    """What a context must match to be reused: model shape, recipe and state layout (plain data)."""
    return {"architecture": info.architecture, "num_layers": info.num_layers, "num_kv_heads": info.num_kv_heads,
            "head_dim": info.head_dim, "vocab_size": info.vocab_size, "recipe": str(recipe) if recipe is not None else None,
            "state": [[s.name, s.kind, [int(d) for d in s.shape], str(s.dtype).removeprefix("torch."), s.seq_dim] for s in specs]}


@dataclass
class Context:
    """A prefilled, possibly compressed cache: ``state`` (one tensor per state spec), the context's
    ``attention_mask`` [B, T] (left padding), ``next_positions`` [B, 1] and ``last_logits`` [B, V]."""

    state: list
    attention_mask: torch.Tensor
    next_positions: torch.Tensor
    last_logits: torch.Tensor
    layout: dict

    @property
    def batch(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def tokens(self) -> torch.Tensor:
        """Real context tokens per row."""
        return self.attention_mask.sum(dim=1)

    @property
    def kv_bytes(self) -> int:
        kinds = [s[1] for s in self.layout["state"]]
        return sum(t.numel() * t.element_size() for t, k in zip(self.state, kinds) if k == "kv")

    def copy(self) -> Context:
        """A deep copy (every state tensor cloned): the copy and the original evolve independently."""
        return Context([t.clone() for t in self.state], self.attention_mask.clone(), self.next_positions.clone(),
                       self.last_logits.clone(), json.loads(json.dumps(self.layout)))

    def check(self, specs, info, recipe) -> None:
        """``ValueError`` naming the first field where this context differs from the model it is used with."""
        want = layout(specs, info, recipe)
        for key in want:
            if self.layout.get(key) != want[key]:
                raise ValueError(f"this context was made for another model or recipe: {key} is {self.layout.get(key)!r}, "
                                 f"the model has {want[key]!r}; prefill the context again with this model")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the context as safetensors (no pickle)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        tensors = {f"state.{i}": t.contiguous() for i, t in enumerate(self.state)}
        tensors.update(attention_mask=self.attention_mask.contiguous(), next_positions=self.next_positions.contiguous(),
                       last_logits=self.last_logits.contiguous())
        save_file(tensors, str(path), metadata={"format": FORMAT, "layout": json.dumps(self.layout)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Context:
        """Read a saved context; a missing, corrupt or foreign file is a ``ValueError`` that says so."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"context file {str(path)!r} not found")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                tensors = {n: f.get_tensor(n) for n in names}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable safetensors context ({type(exc).__name__}: {str(exc)[:200]})") from None
        if meta.get("format") != FORMAT or len(meta.get("layout", "")) > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a graphwright context (format {meta.get('format')!r}; expected {FORMAT!r})")
        try:
            lay = json.loads(meta["layout"])
            count = len(lay["state"])
        except (KeyError, TypeError, ValueError, RecursionError):
            raise ValueError(f"{path}: the context's layout header is malformed") from None
        need = {f"state.{i}" for i in range(count)} | {"attention_mask", "next_positions", "last_logits"}
        if names != need:
            raise ValueError(f"{path}: tensors {sorted(names ^ need)[:5]} missing or unexpected for a {count}-state context")
        return cls([tensors[f"state.{i}"] for i in range(count)], tensors["attention_mask"], tensors["next_positions"],
                   tensors["last_logits"], lay)
