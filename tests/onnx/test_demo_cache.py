"""``graphwright demo`` reuses its ONNX artifact only for the same weights, recipe and code (``cli/demo_cache.py``)."""

from __future__ import annotations

import shutil

import torch

from graphwright.cli import demo_cache
from graphwright.onnx_model import OnnxModel
from tests.conftest import _tiny

RECIPE = "snapkv(budget=6, window=2)"


def test_key_changes_with_recipe_and_weights():
    model = _tiny("tiny-llama")
    key = demo_cache.artifact_key(model, RECIPE)
    assert key == demo_cache.artifact_key(model, RECIPE) and len(key) == 64
    assert key != demo_cache.artifact_key(model, "snapkv(budget=7, window=2)")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert key != demo_cache.artifact_key(model, RECIPE)


def test_cached_needs_the_key_and_an_intact_artifact(onnx_artifact, tmp_path):
    cm, folder = onnx_artifact("tiny-llama", RECIPE)
    mine = tmp_path / "onnx"
    shutil.copytree(folder, mine)
    key = demo_cache.artifact_key(cm.source, RECIPE)
    assert demo_cache.cached(mine, key) is None  # no key file: never reused
    demo_cache.remember(mine, key)
    assert (tmp_path / "onnx.key").read_text().strip() == key and not (mine / "onnx.key").exists()
    assert isinstance(demo_cache.cached(mine, key), OnnxModel)
    assert demo_cache.cached(mine, "0" * 64) is None  # another model / recipe / code
    data = mine / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\1")  # a changed weights file: load refuses, not reused
    assert demo_cache.cached(mine, key) is None
    demo_cache.forget(mine)
    assert not (tmp_path / "onnx.key").exists()
