"""render(): a self-contained HTML page that really renders in headless Chromium.

Chromium is a test dependency (``scripts/install_chromium.sh``); a missing browser fails the
test rather than skipping it, so CI cannot silently stop checking the page.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import graphwright.inspect as gi

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.fail("headless Chromium is required for this test: run `apt-get install -y chromium` "
                    "(or scripts/install_chromium.sh)")
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture
def page(compiled_tiny, tmp_path):
    cm = compiled_tiny("tiny-mixtral")
    sg = cm.step_graph.copy()
    attn = [n for n in sg.gm.graph.nodes if (n.meta.get("graphwright") or {}).get("op") == "attention"]
    attn[0].meta["graphwright"] = {**attn[0].meta["graphwright"], "variant": "lowrank"}
    sg.notes["lowrank_kv"] = {"per_layer": {0: {"r_k": 8, "r_v": 8, "kv_bytes_per_token": 64}}}
    return sg, gi.render(sg, tmp_path / "graph.html")


def test_html_is_self_contained_and_lists_every_layer(page):
    sg, path = page
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "page must not load anything from the network"
    for layer in range(sg.info.num_layers):
        assert f'id="layer-{layer}"' in text
    assert text.count("<details") == sg.info.num_layers + 2  # + model inputs and outputs
    assert 'data-variant="lowrank"' in text and "KV 64 B/token" in text
    assert 'class="gw"' in text and "graphwright.attention.default" in text and "graphwright.moe_experts.default" in text
    for node in sg.gm.graph.nodes:
        assert f"<td>{node.name}</td>" in text


def test_renders_in_headless_chromium(page, tmp_path):
    import matplotlib.image as mpimg

    sg, path = page
    dom = _chromium(tmp_path, "--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    for layer in range(sg.info.num_layers):
        assert re.search(rf'<details[^>]*id="layer-{layer}"', dom.stdout), f"layer {layer} box missing from the DOM"
    assert "Layer 0" in dom.stdout and "lowrank" in dom.stdout

    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", path.as_uri())
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    assert shot.stat().st_size > 5_000
    img = mpimg.imread(str(shot))
    assert img.shape[:2] == (900, 1200)
    pixels = img[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50, "screenshot is (nearly) a single colour"
    # the dark header band and the light page body are both there
    assert img[:40, :, :3].mean() < 0.4 < img[-100:, :, :3].mean()


def test_svg_overview(compiled_tiny, tmp_path):
    cm = compiled_tiny("tiny-llama")
    path = gi.render(cm, tmp_path / "graph.svg")
    text = path.read_text()
    assert text.startswith("<svg") and text.count("layer ") >= cm.info.num_layers


def test_bare_graph_module_renders(compiled_tiny, tmp_path):
    gm = compiled_tiny("tiny-llama").graph
    text = gi.render(gm, tmp_path / "g.html").read_text()
    assert 'id="layer-0"' in text and 'id="layer-1"' in text
