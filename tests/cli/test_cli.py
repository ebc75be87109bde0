"""The ``graphwright`` command line on tiny models: every command's help, JSON results, clean errors."""

import json
import subprocess
import sys

import pytest

from graphwright.cli.main import COMMANDS, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: graphwright {command}") and "--" in out


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "graphwright", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


def test_compile_writes_the_report_as_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["compile", "--model", "tiny-llama", "--recipe", "lowrank_kv(keep=0.5)", "--json", str(out), "--diff"]) == 0
    rep = json.loads(out.read_text())
    assert rep["summary"]["recipe"].startswith("lowrank_kv(keep=0.5")
    assert [r["attention"] for r in rep["rows"]] == ["lowrank", "lowrank"]
    assert abs(rep["summary"]["kv_ratio"] - 0.5) <= 0.01
    printed = capsys.readouterr().out
    assert "lowrank_kv" in printed and "removed" in printed  # report and diff were printed


@pytest.mark.parametrize("recipe, needle", [
    ("lowrank_kv(kep=0.5)", "did you mean 'keep'"),
    ("no_such_pass", "unknown pass 'no_such_pass'"),
    ("fuse_moe", "fuse_moe needs ['moe_experts']"),
    ("lowrank_kv(keep=2)", "keep"),
])
def test_bad_recipes_exit_2_with_a_message(recipe, needle, capsys):
    assert main(["compile", "--model", "tiny-llama", "--recipe", recipe]) == 2
    out = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert out.startswith("error:") and needle in out and "Traceback" not in out


def test_missing_model_file_is_a_clean_error(tmp_path, capsys):
    assert main(["compile", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "nope.gguf" in capsys.readouterr().err


def test_inspect_writes_picture_graph_and_diff(tmp_path):
    assert main(["inspect", "--model", "tiny-qwen2", "--recipe", "lowrank_kv(keep=0.6)", "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"graph.html", "report.json", "diff.json"} <= names
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert diff  # the lowrank rewrite changed the graph
    assert "<html" in (tmp_path / "graph.html").read_text().lower()


def test_triton_backend_on_cpu_is_a_clean_error(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["compile", "--model", "tiny-llama", "--backend", "triton"]) == 2
    out = capsys.readouterr().err
    assert out.startswith("error: backend='triton' needs the model on a CUDA device (it is on cpu)")
    assert "backend='torch'" in out


def test_backend_choice_reaches_the_compiled_model(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["compile", "--model", "tiny-llama", "--backend", "reference", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["backend"] == "reference"
    with pytest.raises(SystemExit) as e:
        main(["compile", "--model", "tiny-llama", "--backend", "cuda"])
    assert e.value.code == 2 and "invalid choice: 'cuda'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_on_smollm2_long_prompt_answers_like_dense_with_a_quarter_of_the_cache(tmp_path):
    """`graphwright demo` (ONNX export is covered by tests/onnx/test_passes.py): on the long prompt the
    compressed model gives the dense model's correct answer holding about a quarter of its KV bytes;
    the short prompt keeps everything (budget > prompt) and says so; the steering example changes the output."""
    assert main(["demo", "--out", str(tmp_path), "--max-new-tokens", "16", "--context-tokens", "800", "--no-onnx",
                 "--steer"]) == 0
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert demo["recipe"] == "snapkv(budget=200)"
    hf, ours = demo["long"]["sides"]
    assert hf["correct"] and ours["correct"] and "Richard" in ours["text"]
    assert 0.2 < ours["kv_bytes"] / hf["kv_bytes"] < 0.3
    s_hf, s_ours = demo["short"]["sides"]
    assert s_ours["tokens"] == s_hf["tokens"] and s_ours["kv_bytes"] == s_hf["kv_bytes"]
    assert "cannot make this faster" in demo["short"]["note"]
    steer = json.loads((tmp_path / "steering.json").read_text())
    assert steer["emphasis"] and steer["emphasis"][0] in steer["prompt"]
    assert steer["steered"] != steer["unsteered"]


def test_missing_head_set_names_what_ships():
    from graphwright.steer.headsets import headset_path

    with pytest.raises(FileNotFoundError, match="shipped: .*smollm2-135m_json.*smollm2-135m_pronoun"):
        headset_path("smollm2-135m", "nope")


def test_export_timings_prints_the_phases(tmp_path, capsys):
    """`graphwright export --timings` prints one row per phase recorded in graphwright.json, then the total."""
    out = tmp_path / "onnx"
    assert main(["export", "--model", "tiny-llama", "--out", str(out), "--no-verify", "--timings"]) == 0
    phases = json.loads((out / "graphwright.json").read_text())["export"]["phases"]
    assert {"torch_export", "onnx_translate", "onnx_optimize", "save"} <= set(phases)
    printed = capsys.readouterr().out.splitlines()
    rows = {line.split()[0] for line in printed if line.split()}
    assert set(phases) <= rows and "total" in rows

