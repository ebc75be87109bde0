import json

import pytest

from graphwright.heads import HeadSet, load_headset, shipped_headset
from graphwright.heads.headset import FORMAT


def make(scores=((0.9, 0.1), (0.5, 0.5))):
    return HeadSet(model="m", method="retrieval", scores=scores, retrieval=frozenset({(0, 0)}))


def test_select_ranks_by_score_with_ties_to_lower_layer_then_head():
    hs = make()
    assert hs.ranked() == [(0, 0), (1, 0), (1, 1), (0, 1)]
    assert hs.select(0.0) == frozenset()
    assert hs.select(0.5) == {(0, 0), (1, 0)}
    assert hs.select(1.0) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    with pytest.raises(ValueError, match=r"retrieval fraction must be a number in \[0, 1\], got 1.5"):
        hs.select(1.5)


def test_save_and_load_round_trip_and_refuse_overwrite(tmp_path):
    hs = make()
    path = hs.save(tmp_path / "h.json")
    assert load_headset(path) == hs
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        hs.save(path)


@pytest.mark.parametrize("patch, message", [
    ({"format": "x"}, "'format' must be"),
    ({"scores": [[0.1], [0.1, 0.2]]}, "scores row 1 has 2 entries"),
    ({"scores": [[float("nan")]]}, "finite"),
    ({"retrieval": [[5, 0]]}, r"retrieval head \[5, 0\] is outside 1 layers x 1 KV heads"),
    ({"retrieval": [["0", 0]]}, "integer pairs"),
    ({"method": "magic"}, "method must be one of"),
])
def test_malformed_files_name_the_field(tmp_path, patch, message):
    data = {"format": FORMAT, "model": "m", "method": "duo", "scores": [[0.3]], "retrieval": [], **patch}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_headset(path)


def test_not_json_and_missing_files_are_clear(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_headset(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_headset(tmp_path / "missing.json")
    assert shipped_headset("no-such-model") is None


def test_check_model_names_both_shapes():
    with pytest.raises(ValueError, match=r"has 2 layers x 2 KV heads; the model 'x' has 30 x 3"):
        make().check_model(30, 3, "x")


def test_the_shipped_smollm2_head_sets_fit_the_model_and_say_how_they_were_made():
    duo, ret = shipped_headset("smollm2-135m"), shipped_headset("smollm2-135m", "retrieval")
    for hs in (duo, ret):
        hs.check_model(30, 3, "smollm2-135m")
    assert duo.method == "duo" and ret.method == "retrieval"
    # the gates fitted on the answer rows over a dense prompt, as duo runs (session 25), on 4k samples with a
    # 512-token window (session 26)
    assert duo.settings["mixed_rows"] == "answer" and duo.settings["context_tokens"] == 4096
    assert (duo.settings["sink"], duo.settings["recent"], duo.settings["samples"], duo.settings["steps"]) == (4, 513, 32, 300)
    assert len(duo.retrieval) == 45 and len(duo.select(0.375)) == 34  # default: target sparsity 0.5
    assert duo.ranked()[:3] == [(14, 0), (14, 1), (17, 1)]  # its three highest gates
