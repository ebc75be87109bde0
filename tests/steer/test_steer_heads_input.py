"""``steer(heads=...)`` given careless or hostile values (issue 19, item 9).

Invariant: every bad ``heads`` is a ``RecipeError`` naming ``heads`` and the accepted forms; a path
is read only when it is a regular file of bounded size (a directory, device or FIFO is never
opened, so ``/dev/zero`` cannot be read without end).
"""

from __future__ import annotations

import os

import pytest

import graphwright as gw
from graphwright import RecipeError
from graphwright.passes.steer import MAX_HEAD_FILE_BYTES, parse_heads


def heads_error(value, match):
    with pytest.raises(RecipeError, match=match) as e:
        parse_heads(value, num_layers=2, num_heads=4)
    assert "steer: heads" in str(e.value) or "steer: head-set file" in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("value", ["/", ".", "/dev/zero", "/dev/null"])
def test_directories_and_devices_are_not_read(value):
    heads_error(value, "not a regular file")


def test_empty_string():
    heads_error("", "is empty")


def test_fifo_is_not_opened(tmp_path):
    fifo = tmp_path / "heads.fifo"
    os.mkfifo(fifo)
    heads_error(str(fifo), "not a regular file")  # opening it would block forever


def test_missing_and_unspeakable_paths(tmp_path):
    heads_error(str(tmp_path / "nope.json"), "neither 'all', 'auto', nor an existing JSON head-set file")
    heads_error("a\x00b", "neither 'all', 'auto'")
    heads_error("x" * 5000, "neither 'all', 'auto'")


def test_oversized_file_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * (MAX_HEAD_FILE_BYTES + 1))
    heads_error(str(p), f"at most {MAX_HEAD_FILE_BYTES}")


@pytest.mark.parametrize("content", [b"\xff\xfe", b"{", b"[" * 100_000 + b"]" * 100_000])
def test_bad_json_file(tmp_path, content):
    p = tmp_path / "bad.json"
    p.write_bytes(content)
    heads_error(str(p), "not valid UTF-8 JSON")


@pytest.mark.parametrize("value", [[[0]], [0, [0]], ["0"], [True]])
def test_list_items_must_be_layer_indices(value):
    heads_error(value, "each item must be a layer index")


def test_json_file_with_nested_list(tmp_path):
    p = tmp_path / "h.json"
    p.write_text('{"heads": [[0]]}')
    heads_error(str(p), "each item must be a layer index")


def test_good_file_still_works(tmp_path):
    p = tmp_path / "h.json"
    p.write_text('{"heads": {"1": [0, 2]}}')
    assert parse_heads(str(p), 2, 4) == {1: [0, 2]}


@pytest.mark.parametrize("value", ["'/'", "''", "[[0]]"])
def test_compile_gives_the_recipe_error(tiny, value):
    with pytest.raises(RecipeError, match="steer: heads"):
        gw.compile(tiny("tiny-llama"), recipe=f"steer(heads={value})")
