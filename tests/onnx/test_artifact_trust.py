"""Artifacts are untrusted input: graphwright.json is checked against its schema, every file the export
wrote is hashed and checked at load, a failed export is refused, the tokenizer's code never runs, and
export replaces only files graphwright itself recorded.

Each malformed field must give a GraphwrightError naming the field (no TypeError/KeyError/IndexError/
ZeroDivisionError/RecursionError, no file outside the folder opened).
"""

import copy
import hashlib
import json
import shutil

import pytest

import graphwright as gw
from graphwright.codegen.onnx.manifest import record_files
from graphwright.errors import GraphwrightError
from tests.conftest import _tiny
from tests.models.test_untrusted_folders import answer_yes, plant_custom_tokenizer  # noqa: F401 - fixture

RECIPE = "fastgen(recovery=0.9)"  # a decode graph and runtime-op records (its prompt step is split) in the metadata


@pytest.fixture
def artifact(onnx_artifact, tmp_path):
    """A private copy of the shared tiny-llama FastGen export: (folder, its parsed graphwright.json)."""
    _, src = onnx_artifact("tiny-llama", RECIPE)
    out = tmp_path / "art"
    shutil.copytree(src, out)
    return out, json.loads((out / "graphwright.json").read_text())


def write_meta(folder, meta):
    (folder / "graphwright.json").write_text(json.dumps(meta))


def word_tokenizer(vocab: int = 256):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w1", pad_token="w0", eos_token="w2")


def test_export_records_hashes_and_load_checks_them(artifact):
    out, meta = artifact
    assert set(meta["files"]) == {"model.onnx", "model.onnx.data", "decode.onnx"}
    for name, rec in meta["files"].items():
        data = (out / name).read_bytes()
        assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    gw.load(out)
    data = bytearray((out / "model.onnx.data").read_bytes())
    for i in range(0, len(data), 50):  # flip 2% of the weight bytes, size unchanged
        data[i] ^= 0xFF
    (out / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(GraphwrightError, match=r"model.onnx.data: content hash mismatch"):
        gw.load(out)
    gw.load(out, verify_hashes=False)  # documented opt-out: loads the changed weights unchecked
    (out / "model.onnx.data").write_bytes(bytes(data[:-4]))
    with pytest.raises(GraphwrightError, match=r"model.onnx.data: \d+ bytes, \d+ recorded at export"):
        gw.load(out)


def test_unrecorded_or_missing_hashes_are_refused(artifact):
    out, meta = artifact
    (out / "extra.onnx").write_bytes(b"planted")
    with pytest.raises(GraphwrightError, match=r"extra.onnx not recorded in graphwright.json\['files'\]"):
        gw.load(out)
    (out / "extra.onnx").unlink()
    write_meta(out, {k: v for k, v in meta.items() if k != "files"})
    with pytest.raises(GraphwrightError, match=r"no content hashes.*verify_hashes=False"):
        gw.load(out)


def test_failed_verification_is_refused_unless_allowed(artifact):
    out, meta = artifact
    write_meta(out, {**meta, "verification": {"passed": False, "error": "max |logit difference| 3.1 > 0.001"}})
    with pytest.raises(GraphwrightError, match=r"failed its export verification \(max \|logit difference\| 3.1.*allow_unverified=True"):
        gw.load(out)
    assert gw.load(out, allow_unverified=True).info.num_layers == 2


def _set(path, value):
    """A mutation of the metadata: set the dotted/indexed ``path`` to ``value``."""
    def mutate(meta):
        keys = path.split(".")
        node = meta
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return meta
    return mutate


def _drop(path):
    def mutate(meta):
        *keys, last = path.split(".")
        node = meta
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        del node[last]
        return meta
    return mutate


NOISE = {"input": "keyformer_noise0", "kind": "keyformer_gumbel", "seed": 0, "layer": 0, "heads": 4, "key_positions": "k0",
         "meta": "k0"}
# id: (mutation, expected message pattern)
CASES = {
    "model_file_escapes": (_set("model_file", "../../../../etc/passwd"), r"model_file: a relative path inside the artifact folder"),
    "model_file_absolute": (_set("model_file", "/etc/passwd"), r"model_file: a relative path inside"),
    "model_file_not_str": (_set("model_file", 7), r"model_file: a relative path inside.*got 7"),
    "tokenizer_escapes": (_set("tokenizer", "../../tok"), r"tokenizer: a relative path inside the artifact folder or null"),
    "decode_escapes": (_set("decode.model_file", "../../decode.onnx"), r"decode.model_file: a relative path inside"),
    "gemfilter_escapes": (_set("gemfilter", {"model_file": "../../../etc/passwd", "layer": 0, "keep": 4, "kernel": 5}),
                          r"gemfilter.model_file: a relative path inside"),
    "files_key_escapes": (_set("files", {"../x": {"sha256": "0" * 64, "bytes": 1}}), r"files\['../x'\]: a relative path inside"),
    "num_layers_huge": (_set("model_info.num_layers", 10**9), r"model_info.num_layers: an integer in \[1, 1024\]; got 1000000000"),
    "num_layers_str": (_set("model_info.num_layers", "2"), r"model_info.num_layers: an integer in \[1, 1024\]; got '2'"),
    "num_heads_zero": (_set("model_info.num_heads", 0), r"model_info.num_heads: an integer in \[1, 4096\]"),
    "vocab_float": (_set("model_info.vocab_size", 256.0), r"model_info.vocab_size: an integer"),
    "model_info_list": (_set("model_info", []), r"model_info: an object; got \[\]"),
    "state_layer_past_model": (_set("state.0.layer", 5), r"state\[0\].layer: an integer in \[0, 1\] or null; got 5"),
    "seq_dim_out_of_shape": (_set("state.0.seq_dim", 7), r"state\[0\].seq_dim: an integer in \[0, 3\]; got 7"),
    "state_name_missing": (_drop("state.0.name"), r"state\[0\].name: a string"),
    "state_dtype_unknown": (_set("state.0.dtype", "Tensor"), r"state\[0\].dtype: one of \['float32'"),
    "state_not_list": (_set("state", {"k0": 1}), r"state: a list"),
    "shape_empty": (_set("state.0.shape", []), r"state\[0\].shape: a list of 1 to 8 dims"),
    "inputs_reordered": (_set("inputs.0", "positions"), r"inputs: distinct names"),
    "inputs_missing_state": (lambda m: {**m, "inputs": m["inputs"][:-1]}, r"inputs: \('input_ids', 'positions', 'logits_index'\) \+ the state"),
    "outputs_no_logits": (_set("outputs.0", "x"), r"outputs: a list starting with 'logits'"),
    "runtime_op_unknown_output": (_set("runtime_ops.0.args.0", {"output": "nope"}), r"runtime_ops\[0\].args\[0\].output: one of"),
    "runtime_op_unknown": (_set("runtime_ops.0.op", "os::system"), r"runtime_ops\[0\].op: one of \['graphwright::evict"),
    "runtime_op_nan_value": (_set("runtime_ops.0.args.6", {"value": float("nan")}),
                             r"runtime_ops\[0\].args\[6\].value: null, a bool, a finite number"),
    "runtime_ops_dropped": (_set("runtime_ops", []), r"outputs: a '<name>_next' output \(or a runtime op result\) for every state"),
    "capacity_zero": (_set("decode.capacity.k0.slots", 0), r"decode.capacity\['k0'\].slots: an integer in \[1, "),
    # decode_policies.host_inputs (Keyformer's noise, drawn by the runtime): every field checked before a draw
    "host_input_state_unknown": (_set("decode.host_inputs", [{**NOISE, "key_positions": "nope"}]),
                                 r"decode.host_inputs\[0\].key_positions: one of \["),
    "host_input_kind_unknown": (_set("decode.host_inputs", [{**NOISE, "kind": "os.system"}]),
                                r"decode.host_inputs\[0\].kind: one of \['keyformer_gumbel'\]; got 'os.system'"),
    "host_input_seed_negative": (_set("decode.host_inputs", [{**NOISE, "seed": -1}]), r"decode.host_inputs\[0\].seed: an integer"),
    "verification_passed_str": (_set("verification", {"passed": "yes"}), r"verification.passed: true or false; got 'yes'"),
    "bad_sha": (_set("files.model.onnx", {"sha256": "abc", "bytes": 3}), r"files\['model.onnx'\].sha256: 64 lowercase hex digits"),
    "format_version_future": (_set("format_version", 99), r"format_version: an integer in \[1, 2\]; got 99"),
    "state_shape_vs_graph": (_set("state.0.shape", [-1, 3, 0, 16]), r"state\[0\] \(k0\): shape \[-1, 3, 0, 16\] does not match the graph input"),
    "state_dtype_vs_graph": (_set("state.0.dtype", "float16"), r"state\[0\] \(k0\): dtype 'float16', but the graph input is tensor\(float\)"),
    "report_columns_unhashable": (_set("report.columns", [["x"]]), r"report.columns\[0\]: a string"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_metadata_is_a_clear_error(artifact, case):
    out, meta = artifact
    mutate, pattern = CASES[case]
    if case == "bad_sha":  # "files.model.onnx" splits on the dot in the file name
        meta["files"]["model.onnx"] = {"sha256": "abc", "bytes": 3}
    else:
        meta = mutate(copy.deepcopy(meta))
    write_meta(out, meta)
    with pytest.raises(GraphwrightError, match=pattern):
        gw.load(out)


def test_symlink_out_of_the_folder_is_refused(artifact, tmp_path):
    out, meta = artifact
    (tmp_path / "elsewhere").mkdir()
    shutil.move(out / "model.onnx", tmp_path / "elsewhere" / "model.onnx")
    (out / "link").symlink_to(tmp_path / "elsewhere")
    write_meta(out, {**meta, "model_file": "link/model.onnx"})
    with pytest.raises(GraphwrightError, match=r"model_file: a relative path inside the artifact folder .symlinks"):
        gw.load(out)


@pytest.mark.parametrize("depth", [100_000, 100])
def test_deep_json_is_a_clear_error(artifact, depth):
    out, meta = artifact
    if depth > 1000:  # too deep for json's recursion
        (out / "graphwright.json").write_text("[" * depth + "]" * depth)
        pattern = r"graphwright.json: metadata nests too deeply to parse"
    else:  # parses, but deeper than any graphwright.json
        write_meta(out, {**meta, "report": {"summary": json.loads("[" * depth + "]" * depth)}})
        pattern = rf"graphwright.json: metadata nests {depth + 2} levels deep; at most 32"
    with pytest.raises(GraphwrightError, match=pattern):
        gw.load(out)


@pytest.fixture(scope="module")
def tok_export(tmp_path_factory):
    """tiny-llama with a tokenizer, exported (unverified: the probe is covered elsewhere) into a folder that
    already holds a user's tokenizer/mine.txt; returns the folder."""
    out = tmp_path_factory.mktemp("tok") / "art"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "mine.txt").write_text("mine")
    cm = gw.compile(_tiny("tiny-llama"), tokenizer=word_tokenizer(), verify=False)
    gw.export_onnx(cm, out, overwrite=True, verify=False)
    return out


def test_export_keeps_files_it_did_not_write(tok_export, tmp_path):
    """The user's tokenizer/mine.txt survives the export, is not recorded, and makes load refuse the
    tokenizer folder (AutoTokenizer would read it) until it is removed."""
    out = tmp_path / "art"
    shutil.copytree(tok_export, out)
    assert (out / "tokenizer" / "mine.txt").read_text() == "mine"
    files = json.loads((out / "graphwright.json").read_text())["files"]
    assert "tokenizer/tokenizer.json" in files and "tokenizer/tokenizer_config.json" in files
    assert "tokenizer/mine.txt" not in files
    with pytest.raises(GraphwrightError, match=r"tokenizer/mine.txt not recorded"):
        gw.load(out)
    (out / "tokenizer" / "mine.txt").unlink()
    rt = gw.load(out)
    assert rt.tokenizer("w5 w7").input_ids == [5, 7]


def test_export_never_replaces_a_foreign_tokenizer_file(tmp_path):
    """A file graphwright did not write, under a name the export needs, stops the export before
    anything is written, with or without overwrite."""
    out = tmp_path / "art"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("mine")
    cm = gw.compile(_tiny("tiny-llama"), tokenizer=word_tokenizer(), verify=False)
    with pytest.raises(GraphwrightError, match=r"tokenizer/tokenizer.json exist\(s\) and was not written by a graphwright export"):
        gw.export_onnx(cm, out, overwrite=True)
    assert (out / "tokenizer" / "tokenizer.json").read_text() == "mine"
    assert sorted(p.name for p in out.rglob("*")) == ["tokenizer", "tokenizer.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.onnx").write_text("mine")
    with pytest.raises(GraphwrightError, match=r"model.onnx exist\(s\) and was not written by a graphwright export"):
        gw.export_onnx(cm, tmp_path / "other", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["model.onnx"]


def test_artifact_tokenizer_code_never_runs(tok_export, tmp_path, answer_yes):  # noqa: F811 - the fixture
    """A tokenizer_config.json with an auto_map to a .py file (hashes re-recorded, as an author could):
    no prompt, the file never runs, load is a clear error."""
    out = tmp_path / "art"
    shutil.copytree(tok_export, out)
    (out / "tokenizer" / "mine.txt").unlink()
    shutil.rmtree(out / "tokenizer")
    marker = tmp_path / "MARKER"
    plant_custom_tokenizer(out / "tokenizer", marker)
    meta = json.loads((out / "graphwright.json").read_text())
    names = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "graphwright.json"]
    write_meta(out, {**meta, "files": record_files(out, names)})
    with pytest.raises(GraphwrightError, match=r"cannot load the tokenizer without running code from the folder"):
        gw.load(out)
    assert answer_yes == [] and not marker.exists()
