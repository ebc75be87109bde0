"""evict(score='criticalkv', rule='adaptive'): CriticalAdaKV (``ops/adakv_critical.py``) on the packed cache:
identity at budget >= length, ragged heads with the layer's total, each layer's own o_proj weight, steer."""

from __future__ import annotations

import pytest
import torch

from graphwright import RecipeError
from graphwright.compiled import CompiledModel
from graphwright.ops import schema
from graphwright.ops.adakv_scored import EVICT_ADAKV_SCORED
from graphwright.passes.evict import Evict
from graphwright.verify import run_recipe
from tests.conftest import _compiled, left_padded_batch
from tests.passes.eviction_helpers import decode_loop, run_pass
from tests.passes.test_evict_scorers import dense, kept_every_step


@pytest.mark.parametrize("budget", [64, 1.0])
def test_budget_at_least_length_is_the_identity(budget):
    ids, mask, (want_logits, want) = dense("tiny-llama", steps=12)
    ev = run_pass(_compiled("tiny-llama"), Evict(score="criticalkv", budget=budget, window=2, rule="adaptive"))
    assert any(n.target is EVICT_ADAKV_SCORED for n in ev.step_graph.gm.graph.nodes)
    logits, toks, _ = decode_loop(ev, ids, mask, 12)
    assert torch.equal(toks, want)
    assert (logits - want_logits).abs().max() <= 1e-4


def test_heads_are_ragged_the_layer_keeps_its_total_and_reads_its_o_proj():
    cm = _compiled("tiny-llama")
    hk = cm.info.num_kv_heads
    ev = run_pass(cm, Evict(score="criticalkv", budget=10, window=2, rule="adaptive", floor=0.0))
    nodes = [n for n in ev.step_graph.gm.graph.nodes if n.target is EVICT_ADAKV_SCORED]
    assert len(nodes) == cm.info.num_layers
    for layer, n in enumerate(nodes):
        a = schema.bound(n)
        assert a["wo"].op == "get_attr" and "o_proj" in str(a["wo"].target) and f".{layer}." in str(a["wo"].target)
        assert a["scorer"] == "criticalkv" and a["first"] == 0.5 and a["eps"] == 1e-4 and a["floor"] == 0.0
    ids, mask = left_padded_batch(256, [30, 24], seed=7)
    seen, _, _ = kept_every_step(ev, ids, mask, 3)
    ragged = False
    for layer in seen[0]:
        for row in layer:
            sizes = [len(h) for h in row]
            assert sum(sizes) == hk * 10  # kvpress's split keeps exactly the layer's Hk * budget
            ragged |= len(set(sizes)) > 1
    assert ragged
    # the value norm matters: Ada-KV SnapKV with kvpress's split keeps other sets on the same prompt
    snap = run_pass(cm, Evict(score="criticalkv", budget=10, window=2, rule="adaptive", floor=0.0, first=1.0))
    assert kept_every_step(snap, ids, mask, 0)[0][0] != seen[0]


def test_composes_with_steer():
    sg = _compiled("tiny-llama").step_graph
    recipe = "evict(score='criticalkv', budget=6, window=2, rule='adaptive') + steer(heads={0: [1]}, alpha=0.01)"
    new, _, _ = run_recipe(sg, recipe)
    cm = CompiledModel(new)
    ids, mask = left_padded_batch(256, [14, 11], seed=8)
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert out.shape == (2, 14 + 8) and "evict" in new.notes and "steer" in new.notes
    kept = cm.last_stats["kept_tokens_per_head"]
    assert max(h for layer in kept for row in layer for h in row) < 14 + 8


@pytest.mark.parametrize("args,msg", [
    (dict(score="criticalkv", budget=6, rule="adaptive", chunk=4), "ChunkKV selects whole chunks"),
    (dict(score="criticalkv", budget=6, rule="adaptive", when="decode"), "runs only when='prefill'"),
])
def test_refusals(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)


def test_refused_after_duo():
    sg = _compiled("tiny-llama").step_graph
    recipe = "duo(retrieval=[[0, 0], [1, 0]], sinks=2, window=4) + evict(score='criticalkv', budget=6, window=2, rule='adaptive')"
    with pytest.raises(RecipeError, match="CriticalAdaKV's value norm"):
        run_recipe(sg, recipe)
