"""The pass registry as test parameters: every registered pass and the examples it declares.

A pass declares ``examples = {"exact": recipe | None, "lossy": recipe | None, "models": (...),
"first_token_dense": bool}`` on its class (``passes/base.py``). The registry-driven suites
(``test_registry_suite.py``, ``tests/triton/test_registry_backends.py``,
``tests/onnx/test_registry_onnx.py``) are parametrised from here, so a new pass is tested the
moment it is registered, and one without examples fails.
"""

from __future__ import annotations

import itertools

import graphwright.passes  # noqa: F401  (registers every pass)
from graphwright.passes.base import PASS_REGISTRY
from tests.conftest import left_padded_batch

PAIR_MODEL = "tiny-llama"
MOE_PAIR_MODEL = "tiny-mixtral"


def registered() -> list[str]:
    """Every pass the package registers (test-only passes registered by fixtures start with ``test_``)."""
    return sorted(n for n in PASS_REGISTRY if not n.startswith("test_"))


def examples(name: str) -> dict:
    return dict(PASS_REGISTRY[name].examples or {})


def cases(kind: str) -> list[tuple[str, str, str]]:
    """(pass, model, recipe) for every pass and model with an example of ``kind`` ("exact" or "lossy")."""
    out = []
    for name in registered():
        ex = examples(name)
        if ex.get(kind):
            out += [(name, model, ex[kind]) for model in ex.get("models", ())]
    return out


def pairs() -> list[tuple[str, str]]:
    """Every unordered pair of registered passes (the suite runs both orders of each)."""
    return list(itertools.combinations(registered(), 2))


def pair_model(a: str, b: str) -> str:
    """The tiny model a pair is tried on: the MoE one when either pass only applies to MoE models."""
    models = set(examples(a).get("models", ())) & set(examples(b).get("models", ()))
    if PAIR_MODEL in models or not models:
        return MOE_PAIR_MODEL if {"fuse_moe"} & {a, b} else PAIR_MODEL
    return sorted(models)[0]


def prompt(vocab: int = 256, lengths=(14, 9), seed: int = 5):
    """A left-padded batch [2, 14]: row 1 has 5 padding tokens; ids avoid 0..2."""
    return left_padded_batch(vocab, lengths, seed=seed)
