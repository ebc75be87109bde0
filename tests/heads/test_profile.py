import pytest

from graphwright.cli.main import main
from graphwright.heads import HeadSet, load_headset, profile

SMALL = dict(steps=6, samples=2, context=48, sink=2, recent=8, progress=False)


def test_duo_profile_on_a_tiny_model_is_a_head_set_with_its_settings():
    hs = profile("tiny-llama", method="duo", **SMALL)  # the answer-row fit, the default
    assert hs.settings["mixed_rows"] == "answer"
    assert isinstance(hs, HeadSet) and hs.method == "duo" and hs.model == "tiny-llama"
    assert (hs.num_layers, hs.num_kv_heads) == (2, 2)
    assert len(hs.retrieval) == 2  # target sparsity 0.5 of 4 heads (distinct gates)
    assert hs.settings["steps"] == 6 and hs.settings["recent"] == 8 and "target sparsity 0.5" in hs.settings["selection"]
    assert len(hs.measured["loss_every_10"]) == 1 and hs.measured["wall_seconds"] >= 0
    fixed = profile("tiny-llama", method="duo", tau=0.95, **SMALL)
    assert fixed.scores == hs.scores and fixed.retrieval == {(i, j) for i in range(2) for j in range(2) if hs.scores[i][j] >= 0.95}
    assert 0 < len(fixed.retrieval) < 4  # the fit splits these heads at 0.95 (measured: 0.9994, 0.9991, 0.90, 0.90)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="retrieval scoring needs a tokenizer"):
        profile("tiny-llama", method="retrieval", progress=False)
    with pytest.raises(ValueError, match=r"method must be one of \('retrieval', 'duo', 'mass'\), got 'gates'"):
        profile("tiny-llama", method="gates")
    with pytest.raises(ValueError, match="tau must be in"):
        profile("tiny-llama", method="duo", tau=2.0)
    with pytest.raises(ValueError, match=r"data must be one of \('passkey', 'ruler'\), got 'wiki'"):
        profile("tiny-llama", method="duo", data="wiki")
    with pytest.raises(ValueError, match="ruler samples need the model's tokenizer"):
        profile("tiny-llama", method="duo", data="ruler", **SMALL)


def test_every_row_profile_records_how_it_was_fitted_and_differs_from_the_answer_row_fit():
    hs = profile("tiny-llama", method="duo", rows="all", **SMALL)
    assert hs.settings["mixed_rows"] == "all" and hs.settings["data"] == "graphwright.heads.duo_gates.passkey_samples"
    assert len(hs.retrieval) == 2 and hs.scores != profile("tiny-llama", method="duo", rows="answer", **SMALL).scores


def test_cli_writes_a_loadable_file_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "h.json"
    argv = ["heads", "profile", "--model", "tiny-llama", "--method", "duo", "--steps", "4", "--samples", "2", "--context", "48",
            "--sink", "2", "--recent", "8", "--out", str(out)]
    assert main(argv) == 0
    hs = load_headset(out)
    assert hs.method == "duo" and hs.settings["context_tokens"] == 48 and hs.settings["mixed_rows"] == "answer"
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--rows", "all"]) == 0
    assert load_headset(out).settings["mixed_rows"] == "all"


def test_top_overlap_counts_shared_top_heads():
    from graphwright.heads.profiler import top_overlap

    a = HeadSet(model="m", method="retrieval", scores=((0.9, 0.1), (0.5, 0.0)), retrieval=frozenset())
    b = HeadSet(model="m", method="duo", scores=((1.0, 0.2), (0.1, 0.8)), retrieval=frozenset())
    r = top_overlap(a, b, 0.5)
    assert (r["top"], r["shared"], r["shared_heads"]) == (2, 1, [(0, 0)])
    with pytest.raises(ValueError, match="has 2 layers x 2 KV heads"):
        top_overlap(a, HeadSet(model="x", method="duo", scores=((1.0,),), retrieval=frozenset()))
