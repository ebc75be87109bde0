"""Property test: a mutated ``graphwright.json`` never lets anything but a graphwright error out of ``gw.load``.

Each example takes the metadata of a real export (tiny Llama with FastGen: a decode graph, runtime-op
records, state specs, file hashes), mutates one to three places in its JSON tree (replace a value by
another JSON value of any type, including huge, negative, NaN-like, path-escaping and deeply nested
ones; delete a key; add a key) and loads the folder. Whatever happens, the load either succeeds or
raises ``GraphwrightError`` with a message: no ``TypeError``/``KeyError``/``IndexError``/
``ZeroDivisionError``/``RecursionError``/``MemoryError``, no ONNX Runtime or torch error escapes.
A short profile runs with the default tests; the long one (1,200 mutations) is ``slow``.
"""

import copy
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphwright as gw
from graphwright.errors import GraphwrightError

RECIPE = "fastgen(recovery=0.9)"  # a decode graph and runtime-op records (a split prompt step)

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 3, 10**9, 2**31, 2**63, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.5, -0.0, 1e308]),
    st.text(max_size=20),
    st.sampled_from(["../../../../etc/passwd", "/etc/passwd", "model.onnx", "decode.onnx", "tokenizer", "",
                     "float32", "int64", "kv", "positions", "summary", "graphwright.evict_h2o", "k0", "v0"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _paths(root, max_depth: int = 40):
    """Every (path of keys/indices) in a JSON tree down to ``max_depth``, the root excluded (iterative)."""
    stack = [((), root)]
    while stack:
        prefix, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            yield (*prefix, k)
            if len(prefix) < max_depth:
                stack.append(((*prefix, k), v))


def _deep(depth: int):
    v = 0
    for _ in range(depth):
        v = [v]
    return v


MUTATION = st.tuples(st.sampled_from(["replace", "delete", "add", "deep"]), st.integers(min_value=0), VALUES,
                     st.text(min_size=1, max_size=8), st.integers(min_value=1, max_value=5000))


def mutate(meta: dict, mutations) -> dict:
    meta = copy.deepcopy(meta)
    # the deep-nesting mutations last: the tree walk never descends 5,000 levels
    for kind, pick, value, key, depth in sorted(mutations, key=lambda m: m[0] == "deep"):
        paths = list(_paths(meta))
        path = paths[pick % len(paths)]
        parent = meta
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        if kind == "replace":
            parent[last] = value
        elif kind == "deep":
            parent[last] = _deep(depth)
        elif kind == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][key] = value
        elif isinstance(parent[last], list):
            parent[last].append(value)
        else:
            parent[last] = value
    return meta


@pytest.fixture(scope="module")
def folder(onnx_artifact, tmp_path_factory):
    _, src = onnx_artifact("tiny-llama", RECIPE)
    out = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(src, out)
    return out, json.loads((out / "graphwright.json").read_text())


def check_load(out, meta) -> str:
    try:
        (out / "graphwright.json").write_text(json.dumps(meta))
    except (ValueError, RecursionError):
        return "unwritable"  # json.dumps itself refuses (too deep): nothing to load
    try:
        gw.load(out)
    except GraphwrightError as e:
        assert str(e).strip(), "a graphwright error needs a message"
        return "refused"
    return "loaded"


def _fuzz(folder):
    out, meta = folder
    outcomes = []

    @given(st.lists(MUTATION, min_size=1, max_size=3))
    def run(mutations):
        outcomes.append(check_load(out, mutate(meta, mutations)))

    return run, outcomes


SHORT = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _long(n: int):
    return settings(max_examples=int(n * float(os.environ.get("GRAPHWRIGHT_FUZZ_SCALE", 1))), deadline=None,
                    suppress_health_check=list(HealthCheck))


def test_mutated_metadata_loads_or_is_refused_cleanly(folder):
    run, outcomes = _fuzz(folder)
    SHORT(run)()
    assert "refused" in outcomes  # the mutations do reach the validator's refusals
    out, meta = folder
    assert check_load(out, meta) == "loaded"  # and the untouched metadata still loads


@pytest.mark.slow
def test_mutated_metadata_long(folder):
    run, outcomes = _fuzz(folder)
    _long(1200)(run)()
    assert len(outcomes) >= 1000 and "refused" in outcomes
