"""``evict(score='kvzip')`` exported (issue 20): ``kvzip_replay.onnx`` runs KVzip's replay in ONNX Runtime
(``codegen/onnx/kvzip_export.py``, ``runtime/kvzip_onnx.py``). Against the torch runtime on tiny Llama: a
compressed context (three replay chunks) holds the same kept positions per (layer, KV head) slot for slot, K/V
and its last logits within 1e-4; two questions reuse it (decode logits within 1e-4, greedy tokens equal, the
context unchanged); a plain left-padded batch generates the same tokens and holds the same cache; the exact
setting (budget 1.0) equals the dense model. Refused: steering extra inputs, latent (lowrank_kv) layers, a corrupt ``kvzip`` metadata entry."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import graphwright as gw
from graphwright.errors import GraphwrightError
from tests.conftest import _tiny, left_padded_batch
from tests.onnx.kv_compare import assert_onnx_cache_like_torch

N_CTX, CHUNK = 40, 16  # three replay chunks: [0, 16), [16, 32), [32, 40)
RECIPE = f"evict(score='kvzip', budget=0.5, chunk={CHUNK})"
GEN = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0)


def context(n=N_CTX, seed=3):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def assert_same_state(want, got, specs):
    for w, g, spec in zip(want, got, specs):
        assert w.shape == g.shape, spec.name
        if spec.kind == "positions":
            assert torch.equal(w, g), spec.name  # the same kept positions, slot for slot
        else:
            assert (w.float() - g.float()).abs().max().item() <= 1e-4, spec.name


def decode_logits(step, ctx, tokens):
    """Logits [B, n, V] of feeding ``tokens`` [B, n] one by one after a copy of ``ctx``'s state."""
    state, pos, out = [t.clone() for t in ctx.state], ctx.next_positions.clone(), []
    for t in range(tokens.shape[1]):
        logits, state = step(tokens[:, t:t + 1], pos, torch.zeros(1, dtype=torch.long), state)
        out.append(logits)
        pos = pos + 1
    return torch.cat(out, 1)


def test_kvzip_replay_in_onnx_runtime_keeps_the_torch_pairs(onnx_artifact):
    cm, out = onnx_artifact("tiny-llama", RECIPE)
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["verification"]["passed"] and meta["verification"]["kvzip_replay"]["passed"]
    assert meta["kvzip"]["model_file"] == "kvzip_replay.onnx" and len(meta["kvzip"]["layers"]) == cm.info.num_layers
    assert meta["runtime_ops"] == []  # the prompt step only appends; the replay runs after it
    rt = gw.load(out)
    assert rt.prompt_chunk is None  # the replay reads one prompt step's head-major layout (not a dense append)

    c = context()
    want = cm.prefill(c)
    torch_stats = dict(cm.last_stats)
    got = rt.prefill(c)
    assert rt.last_stats["kvzip"]["replay_tokens"] == torch_stats["kvzip"]["replay_tokens"] > N_CTX
    assert rt.last_stats["kvzip"]["kept_fraction"] == torch_stats["kvzip"]["kept_fraction"] < 0.6
    assert_same_state(want.state, got.state, rt.state_specs)
    assert got.kv_bytes == want.kv_bytes < 0.6 * gw.compile(_tiny("tiny-llama"), verify=False).prefill(c).kv_bytes
    assert (got.last_logits - want.last_logits).abs().max().item() <= 1e-4

    before = [t.clone() for t in got.state]
    for q in (torch.tensor([[50, 60, 70]]), torch.tensor([[80, 90]])):  # compress once, ask twice
        assert (decode_logits(rt.step, got, q) - decode_logits(cm._step, want, q)).abs().max().item() <= 1e-4
        tokens = rt.generate(q, context=got, **GEN)
        assert torch.equal(tokens, cm.generate(q, context=want, **GEN))
        assert torch.equal(rt.generate(q, context=got, **GEN), tokens)
    assert all(torch.equal(a, b) for a, b in zip(before, got.state))  # the context is never modified

    ids, mask = left_padded_batch(256, (30, 21), seed=7)  # a plain prompt: each row replayed and compressed
    tokens = cm.generate(ids, attention_mask=mask, **GEN)
    torch_stats = dict(cm.last_stats)
    assert torch.equal(rt.generate(ids, attention_mask=mask, **GEN), tokens)
    assert_onnx_cache_like_torch(torch_stats, rt.last_stats, meta, cm.info, 2)
    shared = gw.load(out, share_weights=True)  # the replay graph reads the step's mapped weights (session_weights.py)
    assert shared.weights.mapped_bytes > 0 and torch.equal(shared.generate(ids, attention_mask=mask, **GEN), tokens)
    assert torch_stats["kv_bytes"] < 0.7 * torch_stats["kv_bytes_dense"]  # it evicted


def test_kvzip_exact_budget_in_onnx_equals_dense(onnx_artifact):
    dense = gw.compile(_tiny("tiny-llama"), verify=False)
    _, out = onnx_artifact("tiny-llama", "evict(score='kvzip', budget=1.0)")
    rt = gw.load(out)
    ids, mask = left_padded_batch(256, (14, 9), seed=5)
    assert (rt.logits(ids, attention_mask=mask) - dense.logits(ids, attention_mask=mask))[mask.bool()].abs().max() <= 1e-4
    assert torch.equal(rt.generate(ids, attention_mask=mask, **GEN), dense.generate(ids, attention_mask=mask, **GEN))
    c, q = context(), torch.tensor([[50, 60, 70]])
    ctx = rt.prefill(c)
    assert rt.last_stats["kvzip"]["replay_tokens"] == 0
    assert torch.equal(rt.generate(q, context=ctx, **GEN), dense.generate(torch.cat([c, q], 1), **GEN)[:, N_CTX:])


def test_kvzip_export_refusals_name_the_problem(onnx_artifact, tmp_path):
    steered = gw.compile(_tiny("tiny-llama"), recipe=f"{RECIPE} + steer(heads={{0: [1]}}, alpha=0.01)", verify=False)
    with pytest.raises(GraphwrightError, match="extra graph inputs"):
        gw.export_onnx(steered, tmp_path / "steered")
    assert not (tmp_path / "steered").exists() or not any((tmp_path / "steered").iterdir())  # refused before writing
    latent = gw.compile(_tiny("tiny-llama"), recipe=f"lowrank_kv(keep=0.5) + {RECIPE}", verify=False)
    with pytest.raises(GraphwrightError, match=r"latent \(lowrank_kv\) layers \[0, 1\] is not exported"):
        gw.export_onnx(latent, tmp_path / "latent")
    assert not (tmp_path / "latent").exists() or not any((tmp_path / "latent").iterdir())
    _, out = onnx_artifact("tiny-llama", RECIPE)
    bad = shutil.copytree(out, tmp_path / "bad")
    meta = json.loads((bad / "graphwright.json").read_text())
    meta["kvzip"]["layers"][0][1] = "no_such_state"
    (bad / "graphwright.json").write_text(json.dumps(meta))
    with pytest.raises(GraphwrightError, match=r"kvzip\.layers\[0\]\[1\]"):
        gw.load(bad, verify_hashes=False)
