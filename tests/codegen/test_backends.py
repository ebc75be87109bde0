"""Backends as objects: one registry drives ``lower``, ``compile``, the CLI and the README; every
compile verifies on the chosen backend, so a wrong kernel fails at compile time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import graphwright as gw
from graphwright import GraphwrightError
from graphwright.capture.ops import ATTENTION
from graphwright.cli.main import build_parser
from graphwright.codegen.backends import BACKENDS, Backend, get_backend, register_backend
from graphwright.codegen.lower import lower
from graphwright.codegen.torch.attention import attention_sdpa
from graphwright.compiled import CompiledModel
from graphwright.verify import run_recipe

BUILT_IN = ("reference", "torch", "triton", "compiled")


@pytest.fixture
def register():
    """register(backend) adds a test-only backend; all are removed afterwards."""
    added = []

    def _register(backend):
        added.append(backend.name)
        return register_backend(backend)

    yield _register
    for name in added:
        BACKENDS.pop(name, None)


def attention_off_by_one_percent(*args, **kwargs):
    return attention_sdpa(*args, **kwargs) * 1.01


def test_a_registered_backend_is_valid_for_compile_and_the_cli(register, tiny):
    clone = register(dataclasses.replace(get_backend("reference"), name="test_reference_clone"))
    cm = gw.compile(tiny("tiny-llama"), recipe="noop", backend="test_reference_clone")
    assert cm.backend == "test_reference_clone" and cm.backend_object is clone
    assert cm.verification["backend"] == "test_reference_clone"
    assert cm.verification["passes"][0]["max_abs_logit_diff"] == 0.0
    args = build_parser().parse_args(["compile", "--model", "tiny-llama", "--backend", "test_reference_clone"])
    assert args.backend == "test_reference_clone"
    ref = CompiledModel(cm.step_graph, backend="reference")
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(cm.logits(ids), ref.logits(ids))


def test_unknown_backends_are_refused_naming_the_available_ones(tiny, capsys):
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; available: reference, torch, triton, compiled"):
        gw.compile(tiny("tiny-llama"), backend="nope")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", "--backend", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_a_broken_kernel_fails_at_compile_time(register):
    register(dataclasses.replace(get_backend("torch"), name="broken",
                                 table={**get_backend("torch").table, ATTENTION: attention_off_by_one_percent}))
    with pytest.raises(GraphwrightError, match=r"lowering to backend 'broken' \(vs the reference backend\) is exact "
                                               r"but changed the probe logits by [0-9.e-]+ \(tolerance 0.0005 for float32\)"):
        gw.compile("tiny-llama", backend="broken")


def test_verification_runs_the_chosen_backend_and_says_when_it_falls_back(register, compiled_tiny):
    sg = compiled_tiny("tiny-llama").step_graph
    register(dataclasses.replace(get_backend("torch"), name="test_gpu_only", check=lambda m: "needs a GPU"))
    _, _, ver = run_recipe(sg, "noop", backend="test_gpu_only")
    assert ver["backend"] == "torch"
    assert ver["fallback"] == "verified on backend 'torch', not 'test_gpu_only': needs a GPU"
    _, _, ver = run_recipe(sg, "noop", backend="reference")
    assert ver["backend"] == "reference" and "fallback" not in ver
    with pytest.raises(ValueError, match="needs a GPU"):
        get_backend("test_gpu_only").require(torch.device("cpu"))


def test_lower_takes_a_name_or_a_backend_and_applies_its_transforms(compiled_tiny):
    gm = compiled_tiny("tiny-llama").graph
    seen = []
    spy = Backend("test_spy", "records the graph it is given", get_backend("reference").table,
                  transforms=(lambda graph: seen.append(graph),), finalize=lambda m: setattr(m, "finalized", True) or m)
    out = lower(gm, spy)
    assert len(seen) == 1 and seen[0] is not gm.graph and out.finalized  # transforms rewrite a copy
    targets = {n.target for n in lower(gm, "torch").graph.nodes}
    assert attention_sdpa in targets and ATTENTION not in targets


def test_lowered_code_names_the_backend_implementations(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    code = cm.lowered_code()
    assert "def forward(" in code and "attention_sdpa" in code and "cache_append" in code
    ref = CompiledModel(cm.step_graph, backend="reference").lowered_code()
    assert "attention_reference" in ref and "cache_append" not in ref and "attention_sdpa" not in ref


def test_the_readme_lists_every_built_in_backend():
    line = "Backends (`graphwright/codegen/backends.py`): " + "; ".join(
        f"`{name}`: {get_backend(name).doc}" for name in BUILT_IN) + "."
    assert line in Path(__file__).resolve().parents[2].joinpath("README.md").read_text().splitlines()
    assert tuple(b for b in BACKENDS if not b.startswith("test_")) == BUILT_IN
