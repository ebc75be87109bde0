"""Export verification crosses the model's sliding window and the recipe's eviction budget (issue 22
item 4): the probe is long enough, records what it crossed, and says what the token cap left uncrossed."""

from __future__ import annotations

import json

import pytest

import graphwright as gw
from graphwright.codegen.onnx.export_probe import MAX_PROBE, UNCROSSED_PROBE, probe_lengths


def test_probe_lengths_follow_windows_and_budgets(tiny):
    gemma = gw.compile(tiny("tiny-gemma3"))
    assert probe_lengths(gemma.step_graph, None) == ((15, 12), {"crossed": {"window": 8}, "uncrossed": {}, "max_tokens": MAX_PROBE})
    llama = gw.compile(tiny("tiny-llama"), recipe="h2o(heavy=4, recent=4)", verify=False)
    (longest, padded), rec = probe_lengths(llama.step_graph, llama.recipe)
    assert rec["crossed"] == {"h2o": 9} and (longest, padded) == (16, 13)
    big = gw.compile(tiny("tiny-llama"), recipe="snapkv(budget=2048)", verify=False)
    (longest, _), rec = probe_lengths(big.step_graph, big.recipe, max_tokens=64)
    assert longest == 64 and rec["crossed"] == {} and rec["uncrossed"] == {"snapkv": 2049}
    (longest, _), rec = probe_lengths(big.step_graph, big.recipe)  # beyond the default cap: a short probe, recorded
    assert longest == UNCROSSED_PROBE and rec["uncrossed"] == {"snapkv": 2049} and rec["max_tokens"] == MAX_PROBE
    both = gw.compile(tiny("tiny-gemma3"), recipe="snapkv(budget=2048)", verify=False)  # the window is still crossed
    (longest, _), rec = probe_lengths(both.step_graph, both.recipe)
    assert longest == UNCROSSED_PROBE and rec["crossed"] == {"window": 8} and rec["uncrossed"] == {"snapkv": 2049}
    mid = gw.compile(tiny("tiny-llama"), recipe="streaming(sinks=4, window=100)", verify=False)  # crossable: its own length
    assert probe_lengths(mid.step_graph, mid.recipe)[0][0] == 100 + 4 + 1 + 3 + 4
    plain = gw.compile(tiny("tiny-llama"))
    assert probe_lengths(plain.step_graph, None)[0] == (7, 4)


@pytest.mark.parametrize("name, recipe, crossed", [
    ("tiny-gemma3", None, {"window": 8}),
    ("tiny-llama", "streaming(sinks=2, window=6)", {"streaming": 9}),
])
def test_export_verification_runs_past_the_window(tmp_path, tiny, name, recipe, crossed):
    cm = gw.compile(tiny(name), recipe=recipe)
    out = gw.export_onnx(cm, tmp_path / "a")
    ver = json.loads((out / "graphwright.json").read_text())["verification"]
    assert ver["passed"] and ver["probe"]["crossed"] == crossed
    assert ver["probe"]["prompt_lengths"][0] > max(crossed.values()) + 3
    with pytest.raises(ValueError, match="verify_tokens must be an int >= 7"):
        gw.export_onnx(cm, tmp_path / "b", verify_tokens=3)
