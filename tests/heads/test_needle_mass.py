"""Needle attention mass (graphwright.heads.needle_mass): the vectorised mass equals its loop, the recorder's answer
rows equal Hugging Face's eager attention probabilities, the chance share is what uniform attention scores, the profile
writes a head set, and head-score shares read the shipped needle-mass set by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from graphwright import RecipeError
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.heads import load_headset, profile
from graphwright.heads.headset import SHIPPED, share_headset_file
from graphwright.heads.needle_mass import needle_mass, needle_mass_reference, needle_positions, score_case
from graphwright.passes.snapkv import resolve_scores

SMOLLM2_INFO = SimpleNamespace(architecture="LlamaForCausalLM", num_layers=30, num_heads=9, num_kv_heads=3, hidden_size=576,
                               vocab_size=49152)


def test_needle_mass_equals_the_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 4, 12, generator=g).softmax(-1)
    needles = torch.rand(10, generator=g) > 0.5
    assert torch.allclose(needle_mass(probs, needles).double(), needle_mass_reference(probs, needles), atol=1e-6)


def test_a_head_on_the_needles_scores_one_and_uniform_attention_the_chance_share():
    needles = torch.zeros(10, dtype=torch.bool)
    needles[3:5] = True
    probs = torch.zeros(2, 3, 13)
    probs[0, :, 3:5] = 0.5  # head 0: every row on the needles
    probs[1, :, :10] = 0.1  # head 1: evenly over the 10 prompt keys
    got = needle_mass(probs, needles)
    assert got.tolist() == pytest.approx([1.0, 0.2])  # 0.2 = |needles| / T, the share the profile subtracts


def test_needle_positions_cover_each_value_and_its_key_phrase():
    tok = ByteTokenizer()
    text = "x" * 40 + " magic is: 1234." + "y" * 30
    mask = needle_positions(tok, text, ["1234"], before=5, after=2)
    start = text.index(" 1234")  # the value and the space before it: 5 byte tokens
    assert mask.nonzero().flatten().tolist() == list(range(start - 5, start + 5 + 2))
    assert needle_positions(tok, "a 12345 b 1234 c", ["1234"], before=0, after=0).nonzero().flatten().tolist() == list(range(9, 14))
    with pytest.raises(ValueError, match="reference '9999' is not in the prompt"):
        needle_positions(tok, text, ["9999"])


def test_recorder_rows_equal_eager_attention_probabilities():
    from graphwright.eval.niah import encode
    from graphwright.eval.ruler import ruler_cases
    from graphwright.models import load_model

    model, _ = load_model("tiny-llama")
    tok = ByteTokenizer()
    case = ruler_cases(tok, tasks=("niah_multivalue",), lengths=(1024,), cases=1, seed=1)[0]
    got = score_case(model, tok, case, max_new_tokens=4)
    ids = torch.tensor([encode(tok, case["prompt"]).input_ids])
    T = ids.shape[1]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(out, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)
    needles = needle_positions(tok, case["prompt"], case["references"])
    want = torch.stack([needle_mass(a[0][:, T:, :], needles) for a in att]).double()
    assert got["mass"].shape == (2, 4) and torch.allclose(got["mass"], want, atol=1e-5)
    assert got["chance"] == pytest.approx(float(needles.sum()) / T) and got["needle_tokens"] == int(needles.sum())


def test_profile_writes_a_mass_head_set_and_refuses_without_a_tokenizer():
    hs = profile("tiny-llama", method="mass", tokenizer=ByteTokenizer(), lengths=(1024,), cases=1, max_new_tokens=3,
                 threshold=0.0, progress=False)
    assert hs.method == "mass" and (hs.num_layers, hs.num_kv_heads) == (2, 2)
    assert all(s >= 0 for row in hs.scores for s in row)
    assert hs.retrieval == {(i, j) for i in range(2) for j in range(2) if hs.scores[i][j] > 0.0}
    assert hs.settings["data"] == "graphwright.eval.ruler niah_multivalue (seed 1)" and hs.settings["gqa_pool"] == "mean"
    assert len(hs.measured["rows"]) == 1
    with pytest.raises(ValueError, match="needle mass needs a tokenizer"):
        profile("tiny-llama", method="mass", progress=False)


def test_the_shipped_needle_mass_set_and_its_recipe_spelling():
    hs = load_headset(SHIPPED / "smollm2-135m_mass.json")
    assert hs.method == "mass" and (hs.num_layers, hs.num_kv_heads) == (30, 3)
    assert hs.settings["lengths"] == [2048] and hs.settings["data"].endswith("(seed 1)")  # never the evaluation's seed 0
    top = [tuple(p[:2]) for p in hs.measured["top_kv_heads"][:3]]
    assert top == [(21, 2), (17, 1), (18, 2)]
    assert share_headset_file("smollm2-135m", "shipped:mass").name == "smollm2-135m_mass.json"
    assert share_headset_file("smollm2-135m", "shipped").name == "smollm2-135m_retrieval.json"
    assert resolve_scores("shipped:mass", SMOLLM2_INFO) == [list(r) for r in hs.scores]
    with pytest.raises(RecipeError, match=r"'shipped:<method>' takes a method of \('retrieval', 'duo', 'mass'\)"):
        resolve_scores("shipped:gates", SMOLLM2_INFO)
