"""ONNX tests share their artifacts: each (model, recipe) is compiled and exported once per session."""

from __future__ import annotations

import functools
import re

import pytest

import graphwright as gw
from tests.conftest import _tiny


@pytest.fixture(scope="session")
def onnx_artifact(tmp_path_factory):
    """onnx_artifact(model, recipe) -> (CompiledModel, export folder), cached for the session.

    ``export_onnx`` verifies the artifact against the torch module, so the compile skips its own check.
    """
    root = tmp_path_factory.mktemp("onnx-artifacts")

    @functools.lru_cache(maxsize=None)
    def get(model: str, recipe: str):
        cm = gw.compile(_tiny(model), recipe=recipe, verify=False)
        folder = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{model}-{recipe}")[:120]
        return cm, gw.export_onnx(cm, root / folder)

    return get
