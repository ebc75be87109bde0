"""``duo + lowrank_kv``: LoRC latents factored per head group; streaming latents keep sinks + window.

Oracle: a copy of the model whose K/V projections are the compiled graph's rank-reduced weights
(per head group on a split layer: W_eff = k_up_g^T k_down_g, the same for V with
``value_path='reconstruct'``; on the other layers LoRC's own factors), run densely for the prefill
and with duo's mask for the decode steps (``window(size=window + 1, sinks, heads=streaming query
heads)``, as ``test_duo.py``). Tiny Llama and Qwen2 (k/v biases), batch 2 left-padded, 56 decode steps.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

import graphwright as gw
from graphwright.runtime.score import stream_logits
from tests.conftest import _tiny, left_padded_batch

GEN = dict(eos_token_id=[], pad_token_id=0)
PROMPT, PREFILL, SINKS, WINDOW = dict(lengths=(80, 73), seed=3), 24, 2, 5
DUO = f"duo(retrieval=[[0, 0]], sinks={SINKS}, window={WINDOW})"  # layer 0 split, layer 1 all streaming
ALL_RET = "duo(retrieval=[[0, 0], [0, 1], [1, 0], [1, 1]], sinks=2, window=5)"


@functools.lru_cache(maxsize=None)
def _cm(name: str, recipe: str, backend: str = "torch"):
    return gw.compile(_tiny(name), recipe=recipe, backend=backend, verify=False)


@functools.lru_cache(maxsize=None)
def _stream(name: str, recipe: str, backend: str = "torch"):
    cm = _cm(name, recipe, backend)
    ids, mask = left_padded_batch(256, **PROMPT)
    return stream_logits(cm._step, cm.runtime_graph.state, ids, mask, PREFILL)


def _effective(gm, prefix: str):
    """Dense [out, d] weights of a latent factor pair (up^T @ down), or None if absent."""
    p = dict(gm.named_parameters())
    if f"{prefix}_down" not in p:
        return None
    return (p[f"{prefix}_up"].double().T @ p[f"{prefix}_down"].double()).float()


def _rank_reduced_model(name: str, cm):
    """The HF model with each layer's K/V projection replaced by the compiled graph's low-rank weights."""
    model = copy.deepcopy(_tiny(name))
    gm, D = cm.step_graph.gm, cm.step_graph.info.head_dim
    duo = cm.step_graph.notes["duo"]["per_layer"]
    for layer, attn in enumerate(model.model.layers):
        attn = attn.self_attn
        for kv in ("k", "v"):
            w = getattr(attn, f"{kv}_proj").weight
            with torch.no_grad():
                eff = _effective(gm, f"gw_lowrank_l{layer}_{kv}")
                if eff is not None:
                    w.copy_(eff)
                    continue
                for group, key in (("ret", "retrieval"), ("str", "streaming")):
                    rows = [h * D + i for h in duo[layer][key] for i in range(D)]
                    w[rows] = _effective(gm, f"gw_duo_l{layer}_{group}_{kv}")
    return model


@functools.lru_cache(maxsize=None)
def _oracle(name: str, keep: float):
    """Logits of the rank-reduced model under duo's mask (dense prefill, masked decode)."""
    cm = _cm(name, f"{DUO} + lowrank_kv(keep={keep}, value_path='reconstruct')")
    model = _rank_reduced_model(name, cm)
    g = cm.step_graph.info.num_heads // cm.step_graph.info.num_kv_heads
    duo = cm.step_graph.notes["duo"]["per_layer"]
    heads = {layer: [h * g + j for h in v["streaming"] for j in range(g)] for layer, v in duo.items()}
    dense = gw.compile(model, backend="reference", verify=False)
    masked = gw.compile(model, backend="reference", verify=False,
                        recipe=f"window(size={WINDOW + 1}, sinks={SINKS}, heads={heads!r})")

    def oracle(i, p, idx, state):
        return (dense._step if i.shape[1] > 1 else masked._step)(i, p, idx, state)

    ids, mask = left_padded_batch(256, **PROMPT)
    want, _ = stream_logits(oracle, dense.runtime_graph.state, ids, mask, PREFILL)
    plain, _ = stream_logits(dense._step, dense.runtime_graph.state, ids, mask, PREFILL)
    return want, plain


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_equals_duo_mask_on_rank_reduced_keys_and_values(name):
    """56 teacher-forced decode steps after a 24-token prefill, keep=0.5 (lossy), reconstruct values."""
    want, plain = _oracle(name, 0.5)
    got, state = _stream(name, f"{DUO} + lowrank_kv(keep=0.5, value_path='reconstruct')")
    real = left_padded_batch(256, **PROMPT)[1].bool()
    assert (got - want)[real].abs().max().item() <= 1e-4
    assert (got - plain)[real].abs().max().item() > 0.1  # the duo mask really acts
    cm = _cm(name, f"{DUO} + lowrank_kv(keep=0.5, value_path='reconstruct')")
    shapes = {s.name: tuple(t.shape) for s, t in zip(cm.runtime_graph.state, state)}
    ranks = cm.step_graph.notes["duo"]["latent_ranks"][0]
    assert shapes["k0_latent"] == (2, 80, ranks["ret"]["r_k"]) and shapes["v0_latent"] == (2, 80, ranks["ret"]["r_v"])
    assert shapes["duo_k0"] == (2, SINKS + WINDOW, ranks["str"]["r_k"]) and shapes["duo_positions0"] == (2, 1, SINKS + WINDOW)
    assert shapes["k1_latent"][1] == SINKS + WINDOW
    # each group keeps half of its own H_g * D = 16 dims at layer 0's rank (tiny: 24 of 32 dims for 2 KV heads)
    r0 = cm.step_graph.notes["lowrank_kv"]["per_layer"][0]
    assert ranks["ret"]["r_k"] == ranks["str"]["r_k"] == round(r0["r_k"] / 2) < 16


def test_keep_one_is_duo_alone():
    for vp in ("absorbed", "reconstruct"):
        got, _ = _stream("tiny-llama", f"{DUO} + lowrank_kv(keep=1.0, value_path='{vp}')")
        want, _ = _stream("tiny-llama", DUO)
        real = left_padded_batch(256, **PROMPT)[1].bool()
        assert (got - want)[real].abs().max().item() <= 1e-4
    ids, mask = left_padded_batch(256, (30, 22), seed=1)
    a = _cm("tiny-llama", f"lowrank_kv(keep=1.0) + {DUO}").generate(ids, attention_mask=mask, max_new_tokens=16, **GEN)
    b = _cm("tiny-llama", DUO).generate(ids, attention_mask=mask, max_new_tokens=16, **GEN)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_all_heads_retrieval_is_lowrank_alone(name):
    got, _ = _stream(name, f"{ALL_RET} + lowrank_kv(keep=0.5)")
    want, _ = _stream(name, "lowrank_kv(keep=0.5)")
    real = left_padded_batch(256, **PROMPT)[1].bool()
    assert (got - want)[real].abs().max().item() <= 1e-5
    ids, mask = left_padded_batch(256, (30, 22), seed=1)
    a = _cm(name, f"{ALL_RET} + lowrank_kv(keep=0.5)").generate(ids, attention_mask=mask, max_new_tokens=16, **GEN)
    b = _cm(name, "lowrank_kv(keep=0.5)").generate(ids, attention_mask=mask, max_new_tokens=16, **GEN)
    assert torch.equal(a, b)


def test_absorbed_runs_and_holds_the_same_caches():
    """Absorbed values: another factorisation of the values (the group's value-to-output map), same cache sizes."""
    cm = _cm("tiny-llama", f"lowrank_kv(keep=0.5) + {DUO}")
    got, state = _stream("tiny-llama", f"lowrank_kv(keep=0.5) + {DUO}")
    _, ref_state = _stream("tiny-llama", f"{DUO} + lowrank_kv(keep=0.5, value_path='reconstruct')")
    assert [tuple(t.shape) for t in state] == [tuple(t.shape) for t in ref_state]
    assert torch.isfinite(got).all()
    o = dict(cm.step_graph.gm.named_parameters())["gw_duo_l0_o_absorbed"]
    assert o.shape == (64, 4 * max(r["r_v"] for r in cm.step_graph.notes["duo"]["latent_ranks"][0].values()))


def test_kv_bytes_are_the_caches_held():
    ids, mask = left_padded_batch(256, (30, 22), seed=1)
    cm = _cm("tiny-llama", f"{DUO} + lowrank_kv(keep=0.5)")
    cm.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    notes = cm.step_graph.notes
    ranks, r1 = notes["duo"]["latent_ranks"][0], notes["lowrank_kv"]["per_layer"][1]
    B, S, kept, el = 2, 30 + 9, SINKS + WINDOW, 4  # 9 decode steps fed back, fp32
    ret = S * (ranks["ret"]["r_k"] + ranks["ret"]["r_v"])
    stream = kept * (ranks["str"]["r_k"] + ranks["str"]["r_v"]) + kept * (r1["r_k"] + r1["r_v"])
    assert cm.last_stats["kv_bytes"] == B * el * (ret + stream)
    lowrank = _cm("tiny-llama", "lowrank_kv(keep=0.5)")
    lowrank.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    assert cm.last_stats["kv_bytes"] < 0.5 * lowrank.last_stats["kv_bytes"]


def test_cli_compiles_the_pair(tmp_path, capsys):
    from graphwright.cli.main import main

    out = tmp_path / "report.json"
    assert main(["compile", "--model", "tiny-llama", "--recipe", f"{DUO} + lowrank_kv(keep=0.5)", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["summary"]["passes"] == ["lowrank_kv", "duo"]
    assert "lowrank_kv -> duo" in " ".join(capsys.readouterr().out.split())
