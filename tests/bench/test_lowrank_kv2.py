"""bench/train_kv2_model.py and bench/lowrank_kv2.py end to end on a tiny budget (a few steps, one small layer).

Checks: the trainer writes safetensors only (no pickle) that ``load_model`` reads back with the same
logits, its held-out and unigram perplexities are real numbers computed on the held-out split, and the
sweep's exact setting (keep=1.0, every schedule and scaling) gives ΔPPL 0 on the trained checkpoint
while keep=0.5 keeps half the KV bytes and changes perplexity.
"""

import json
import math

import pytest
import torch

import graphwright as gw
from tests.bench.bench_scripts import load_bench

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "64",
        "--steps", "8", "--batch", "2", "--seq", "64", "--eval-tokens", "512", "--window", "128", "--stride", "64"]


def _load(name):
    return load_bench(name, register=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv2") / "model"
    meta = _load("train_kv2_model").main(["--out", str(out), *TINY])
    return out, meta


def test_trainer_writes_a_loadable_safetensors_model(trained):
    out, meta = trained
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    saved = json.loads((out / "train.json").read_text())
    assert saved == json.loads(json.dumps(meta))
    assert saved["shape"]["kv_heads"] == 2 and saved["shape"]["heads"] == 4 and saved["steps"] == 8
    assert saved["loss_last50"] < saved["loss_first"]  # 8 steps already move off ln(256) = 5.55
    # every held-out byte after the first is scored once (stride < window)
    assert saved["heldout_tokens"] == 511 and 1.0 < saved["heldout_ppl"] < 300.0
    assert 10.0 < saved["unigram_ppl"] < 40.0  # English bytes: ~4.4 bits of unigram entropy
    model, tok = gw.load_model(out)
    assert tok is None  # no tokenizer files: the byte tokenizer is used
    assert model.config.num_key_value_heads == 2
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    again, _ = gw.load_model(out)
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_unigram_perplexity_matches_its_definition():
    mod = _load("train_kv2_model")
    train = torch.tensor([97, 97, 98])  # a, a, b
    ids = torch.tensor([[99, 97, 98]])  # the first token is never scored
    counts = torch.ones(256, dtype=torch.float64)
    counts[97] += 2
    counts[98] += 1
    p = counts / counts.sum()
    want = math.exp(-(math.log(p[97]) + math.log(p[98])) / 2)
    assert mod.unigram_ppl(train, ids) == pytest.approx(want, rel=1e-12)


def test_sweep_keep_one_is_exact_on_the_trained_model(trained, tmp_path):
    out, _ = trained
    res = _load("lowrank_kv2").main(["--model", str(out), "--keeps", "1.0", "0.5", "--tokens", "512",
                                     "--window", "128", "--stride", "64", "--out", str(tmp_path / "r.json"),
                                     "--md", str(tmp_path / "r.md")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(res))
    assert len(res["rows"]) == 8 and res["tokens"] == 511 and "2 KV heads" in res["shape"]
    # same 512 held-out bytes as the trainer's evaluation: the same unigram floor
    assert res["unigram_ppl"] == pytest.approx(trained[1]["unigram_ppl"], rel=1e-12)
    for r in res["rows"]:
        if r["keep"] == 1.0:
            assert r["delta_ppl"] == pytest.approx(0.0, abs=1e-4 * res["dense_ppl"]), r
            assert r["r_k"] == r["r_v"] == [32, 32]  # full rank: min(hidden 64, 2 KV heads x 16)
        else:
            assert abs(r["realised_keep"] - 0.5) <= 0.01 and abs(r["delta_ppl"]) > 1e-3, r
    table = (tmp_path / "r.md").read_text()
    assert "| 1 |" in table and "| 0.5 |" in table and "uniform, scaling=none" in table
