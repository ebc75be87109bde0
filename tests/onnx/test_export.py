"""ONNX export: the artifact passes onnx.checker, reproduces the torch runtime in ONNX Runtime
(greedy tokens exactly, logits within 1e-4) and loads with clear errors when broken.

Each tiny model is exported once per module (export dominates the cost) and shared by the tests.
"""

import functools
import json
import shutil

import onnx
import pytest
import torch

import graphwright as gw
from graphwright.errors import GraphwrightError
from tests.conftest import _compiled, left_padded_batch

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-phi3", "tiny-mistral", "tiny-gpt2", "tiny-mixtral")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")

    @functools.lru_cache(maxsize=None)
    def get(name):
        out = root / name
        gw.export_onnx(_compiled(name), out)
        return out

    return get


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_torch_runtime(name, exports):
    cm, out = _compiled(name), exports(name)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    rt = gw.load(out)
    # lengths 30 and 21 + 24 new tokens: tiny-mistral's 16-token sliding window is passed in prefill and decode
    ids, mask = left_padded_batch(256, [30, 21], seed=4)
    got = rt.logits(ids, mask)
    want = cm.logits(ids, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4
    want_tokens = cm.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    got_tokens = rt.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    assert got_tokens.shape == (2, 30 + 24)
    assert torch.equal(got_tokens, want_tokens)
    # tiny-mistral: both runtimes cache only each sliding layer's window (codegen/onnx/sliding_window.py)
    assert rt.last_stats["kv_bytes"] == cm.last_stats["kv_bytes"]
    if any(cm.info.windows):
        assert cm.last_stats["kv_bytes"] == cm.last_stats["kv_bytes_dense"]


def test_metadata_describes_state_and_model(exports):
    cm, out = _compiled("tiny-mixtral"), exports("tiny-mixtral")
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["format"] == "graphwright-onnx" and meta["opset"] == 23 and meta["recipe"] == "identity"
    assert [s["name"] for s in meta["state"]] == [s.name for s in cm.step_graph.state]
    k0 = next(s for s in meta["state"] if s["name"] == "k0")
    assert k0 == {"name": "k0", "kind": "kv", "shape": [-1, 2, 0, 16], "dtype": "float32", "seq_dim": 2, "layer": 0}
    assert meta["inputs"][:4] == ["input_ids", "positions", "logits_index", "key_positions"]
    assert meta["outputs"][0] == "logits" and len(meta["outputs"]) == len(meta["inputs"]) - 2
    assert meta["model"]["layers"] == 2 and meta["model"]["vocab"] == 256 and meta["model"]["eos"] == [2]
    assert [row["state"] for row in meta["layers"]] == [["k0", "v0"], ["k1", "v1"]]
    nodes = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "Attention" in nodes and "ScatterND" in nodes  # opset-23 attention; MoE in standard ops
    rep = gw.load(out).report()
    assert rep.summary["architecture"] == "MixtralForCausalLM" and len(rep.rows) == 2


def test_refuses_foreign_non_empty_dir(tmp_path, exports):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(GraphwrightError, match="not empty"):
        gw.export_onnx(_compiled("tiny-llama"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_reexport_into_previous_export(tmp_path, exports):
    """A folder holding a previous export is replaced without overwrite=True; only the files that
    export recorded are: a user's tokenizer/ folder stays (it was rmtree'd even for a model without one)."""
    shutil.copytree(exports("tiny-llama"), tmp_path / "x")
    (tmp_path / "x" / "model.onnx").write_bytes(b"stale")
    (tmp_path / "x" / "tokenizer").mkdir()
    (tmp_path / "x" / "tokenizer" / "tokenizer.json").write_text("mine")
    gw.export_onnx(_compiled("tiny-llama"), tmp_path / "x", verify=False)
    onnx.checker.check_model(str(tmp_path / "x" / "model.onnx"))
    assert (tmp_path / "x" / "tokenizer" / "tokenizer.json").read_text() == "mine"


def test_load_errors_are_clear(tmp_path, exports):
    with pytest.raises(GraphwrightError, match="missing graphwright.json"):
        gw.load(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(exports("tiny-llama"), bad)
    (bad / "model.onnx").write_bytes(b"\x00not an onnx model")
    with pytest.raises(GraphwrightError, match=r"model.onnx: \d+ bytes, \d+ recorded at export"):
        gw.load(bad)
    with pytest.raises(GraphwrightError, match="cannot load the model"):
        gw.load(bad, verify_hashes=False)
    (bad / "model.onnx").unlink()
    with pytest.raises(GraphwrightError, match="missing model.onnx"):
        gw.load(bad)
    (bad / "graphwright.json").write_text("{ truncated")
    with pytest.raises(GraphwrightError, match="corrupt metadata"):
        gw.load(bad)


@pytest.mark.slow
def test_smollm2_onnx_greedy_matches_torch(tmp_path):
    model, tok = gw.load_model("smollm2-135m")
    cm = gw.compile(model, tokenizer=tok)
    gw.export_onnx(cm, tmp_path / "smol")
    rt = gw.load(tmp_path / "smol")
    assert rt.tokenizer is not None
    enc = tok(["The capital of France is", "Once upon a time, in a small village, there lived"],
              return_tensors="pt", padding=True, padding_side="left")
    want = cm.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=32, eos_token_id=[])
    got = rt.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=32, eos_token_id=[])
    assert torch.equal(got, want)


def test_export_records_phase_seconds(exports):
    """graphwright.json says where the export's time went: every phase export_onnx runs, in order,
    with non-negative seconds that add up to no more than the total (no timing assertion)."""
    meta = json.loads((exports("tiny-llama") / "graphwright.json").read_text())
    phases, total = meta["export"]["phases"], meta["export"]["total_s"]
    # "wrap": the scan for slot-eviction calls to trace once (slot_functions.py; identity has none, so no "stitch")
    assert list(phases) == ["prepare", "split", "wrap", "torch_export", "onnx_translate", "onnx_optimize", "save", "check",
                            "tokenizer", "metadata", "hash", "verify_session", "verify_probe"]
    assert all(s >= 0 for s in phases.values())
    assert sum(phases.values()) <= total + 0.01 * len(phases)  # rounding to 10 ms per phase
    assert sum(phases.values()) >= 0.8 * total - 0.05  # nothing sizeable runs outside a phase (two small JSON writes do)
    assert list(meta["export"]["cpu"]) == list(phases) and meta["export"]["total_cpu_s"] > 0
    assert meta["verification"]["probe"]["decode_steps"] == 3
    # exporter_shortcuts.py took the short path; the optimizer's rewrite rules were filtered by root op (rule_filter.py)
    assert meta["export"]["notes"] == {"decompositions": "skipped", "rule_filter": "on"}
    from graphwright.codegen.onnx.phases import timings_table

    table = timings_table(meta["export"]).splitlines()  # what `graphwright export --timings` prints
    assert [row.split()[0] for row in table[1:1 + len(phases)]] == list(phases)
    assert table[1 + len(phases)].split()[:2] == ["total", f"{meta['export']['total_s']:.2f}"]
    assert table[-2:] == ["decompositions: skipped", "rule_filter: on"]


def test_verify_steps_knob(tmp_path, exports):
    """verify_steps sets the probe's decode steps (0: prefill only); a negative count is refused
    before anything is written. The probe itself is rerun on the shared export (no second export)."""
    from graphwright.codegen.onnx.artifact import OnnxStep
    from graphwright.codegen.onnx.export import verify_artifact

    cm, out = _compiled("tiny-llama"), exports("tiny-llama")
    with pytest.raises(ValueError, match="verify_steps must be >= 0"):
        gw.export_onnx(cm, tmp_path / "neg", verify_steps=-1)
    assert not (tmp_path / "neg").exists()
    meta = json.loads((out / "graphwright.json").read_text())
    step = OnnxStep.from_metadata(out / "model.onnx", meta, providers=["CPUExecutionProvider"])
    for n in (0, 1):
        res = verify_artifact(cm, step, decode_steps=n)
        assert [s["step"] for s in res["steps"]] == ["prefill", *(f"decode step {i + 1}" for i in range(n))]
        assert res["passed"] and res["max_abs_logit_diff"] <= 1e-4
