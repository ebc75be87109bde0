"""The cases the backend suites run (``tests/triton/test_registry_backends.py``, ``tests/onnx/test_registry_onnx.py``).

Every registered pass's lossy example (its exact one when it has none) on its first example model,
read from the registry so a new pass is covered without editing a test, plus the compositions
issue 16 names. Steered recipes run with ``EMPHASIS`` so the steering input really acts.
"""

from __future__ import annotations

from tests.passes.registry_examples import PAIR_MODEL, examples, registered

# token indices into each row's real prompt (registry_examples.prompt(): 14 and 9 real tokens)
EMPHASIS = [[(2, 9)], [(1, 6)]]

COMPOSITIONS = {
    "lowrank_kv+steer": (PAIR_MODEL, "lowrank_kv(keep=0.5) + steer(heads='all', alpha=0.05)"),
    "lowrank_kv+window": (PAIR_MODEL, "lowrank_kv(keep=0.5) + window(size=6, sinks=2)"),
    "lowrank_kv+block_sparse": (PAIR_MODEL, "lowrank_kv(keep=0.5) + block_sparse(block=4, top_k=2, dense_layers=[])"),
    "lowrank_kv+streaming": (PAIR_MODEL, "lowrank_kv(keep=0.5) + streaming(sinks=2, window=6)"),
    "h2o+steer": (PAIR_MODEL, "h2o(heavy=4, recent=4) + steer(heads='all', alpha=0.05)"),
    "snapkv+think": (PAIR_MODEL, "snapkv(budget=6, window=2) + think(keep=0.5, recent=3, window=4)"),
    "fuse_moe+lowrank_kv+h2o+steer": ("tiny-mixtral",
                                      "fuse_moe + lowrank_kv(keep=0.5) + h2o(heavy=4, recent=4) + steer(heads='all', alpha=0.05)"),
}


def registry_cases() -> dict[str, tuple[str, str]]:
    """pass -> (its first example model, its lossy example or else its exact one)."""
    out = {}
    for name in registered():
        ex = examples(name)
        out[name] = (ex["models"][0], ex.get("lossy") or ex["exact"])
    return out


def backend_cases() -> dict[str, tuple[str, str]]:
    """case id -> (model, recipe): every registered pass, then the compositions."""
    return {**registry_cases(), **COMPOSITIONS}


def emphasis_for(recipe: str):
    return EMPHASIS if "steer" in recipe else None
