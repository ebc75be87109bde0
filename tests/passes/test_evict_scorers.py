"""evict(score=, when=, budget=, rule=): exact settings, preset equivalences, compositions, backends, refusals."""

from __future__ import annotations

import functools

import pytest
import torch

from graphwright import RecipeError
from graphwright.compiled import CompiledModel
from graphwright.passes.evict import DELEGATES, Evict
from graphwright.passes.eviction_common import positions_name
from graphwright.passes.h2o import H2O
from graphwright.passes.snapkv import SnapKV
from graphwright.verify import run_recipe
from tests.conftest import _compiled, left_padded_batch
from tests.passes.eviction_helpers import decode_loop, run_pass, state_of

LENGTHS = [14, 9]  # batch 2, row 1 left-padded by 5
SCORES = ["snapkv", "h2o", "knorm", "tova", "keydiff", "expected_attention", "chunkkv", "criticalkv", "lagkv", "qfilter"]


@functools.lru_cache(maxsize=None)
def dense(name, steps=32, seed=1):
    ids, mask = left_padded_batch(256, LENGTHS, seed=seed)
    return ids, mask, decode_loop(_compiled(name), ids, mask, steps)[:2]


def kept_every_step(cm, ids, mask, steps):
    """Per step (prefill = 0): per layer the kept position sets [B][Hk]."""
    seen = []

    def on_step(i, state):
        seen.append([[[sorted(int(p) for p in row if p >= 0) for row in heads]
                      for heads in state_of(cm, state, positions_name(layer))] for layer in range(cm.info.num_layers)])

    logits, toks, _ = decode_loop(cm, ids, mask, steps, on_step)
    return seen, logits, toks


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("score", SCORES)
def test_fraction_one_is_the_identity(name, score):
    ids, mask, (want_logits, want) = dense(name)
    ev = run_pass(_compiled(name), Evict(score=score, budget=1.0))
    assert Evict(score=score, budget=1.0).is_identity()
    logits, toks, _ = decode_loop(ev, ids, mask, 32)
    assert torch.equal(toks, want)
    assert (logits - want_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("window", [None, 3])
def test_snapkv_setting_keeps_the_snapkv_sets(window):
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=2)
    a = run_pass(cm, Evict(score="snapkv", when="prefill", budget=7, window=window))
    b = run_pass(cm, SnapKV(budget=7, window=window))
    sa, la, ta = kept_every_step(a, ids, mask, 6)
    sb, lb, tb = kept_every_step(b, ids, mask, 6)
    assert sa == sb and torch.equal(ta, tb) and (la - lb).abs().max() <= 1e-5
    assert all(len(h) == 7 for layer in sa[0] for row in layer for h in row)  # evicted after prefill


def test_h2o_setting_keeps_the_h2o_sets():
    cm = _compiled("tiny-qwen2")
    ids, mask = left_padded_batch(256, LENGTHS, seed=3)
    a = run_pass(cm, Evict(score="h2o", when="decode", budget=7, window=3))
    b = run_pass(cm, H2O(heavy=4, recent=3))
    sa, la, ta = kept_every_step(a, ids, mask, 10)
    sb, lb, tb = kept_every_step(b, ids, mask, 10)
    assert sa == sb and torch.equal(ta, tb) and (la - lb).abs().max() <= 1e-5
    assert all(len(h) == 7 for step in sa for layer in step for row in layer for h in row)


def test_adaptive_rule_runs_the_ada_kv_path():
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    a = run_pass(cm, Evict(score="snapkv", budget=8, rule="adaptive", floor=0.0))
    b = run_pass(cm, SnapKV(budget=8, heads="adaptive", floor=0.0))
    la, ta, _ = decode_loop(a, ids, mask, 4)
    lb, tb, _ = decode_loop(b, ids, mask, 4)
    assert torch.equal(la, lb) and torch.equal(ta, tb)


def test_pyramid_rule_gives_layers_decreasing_budgets():
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, [40, 30], seed=5)
    ev = run_pass(cm, Evict(score="knorm", budget=12, window=2, rule="pyramid", beta=4.0))
    seen, _, _ = kept_every_step(ev, ids, mask, 0)
    sizes = [len(seen[0][layer][0][0]) for layer in range(cm.info.num_layers)]
    assert sizes[0] > sizes[-1] and abs(sum(sizes) - 12 * len(sizes)) <= len(sizes)


def test_tova_keeps_one_set_per_layer_and_the_budget_every_step():
    cm = _compiled("tiny-qwen2")
    ids, mask = left_padded_batch(256, LENGTHS, seed=6)
    seen, _, _ = kept_every_step(run_pass(cm, Evict(score="tova", budget=6)), ids, mask, 8)
    for step in seen:
        for layer in step:
            for row in layer:
                assert all(h == row[0] for h in row) and len(row[0]) == 6


def test_every_n_evicts_only_on_those_steps():
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, [12, 12], seed=7)
    seen, _, _ = kept_every_step(run_pass(cm, Evict(score="keydiff", budget=6, when="every:4")), ids, mask, 9)
    sizes = [len(step[0][0][0]) for step in seen]  # lengths 12, 13, ..., 21
    assert sizes == [6, 7, 8, 9, 6, 7, 8, 9, 6, 7]


# Issue 20's audit: every evict score (SCORERS, chunkkv, the DELEGATES) and the preset passes compose with lowrank_kv
# and with steer. Per name: (lossy arguments, budget-exact arguments: nothing is ever evicted on these prompts).
AUDIT = {
    "snapkv": ("budget=6", "budget=1.0"), "h2o": ("budget=6, window=2", "budget=1.0"), "knorm": ("budget=0.5", "budget=1.0"),
    "tova": ("budget=6", "budget=1.0"), "keydiff": ("budget=6", "budget=1.0"),
    "expected_attention": ("budget=6", "budget=1.0"), "criticalkv": ("budget=6", "budget=1.0"),
    "lagkv": ("budget=8, lag=3, sinks=2", "budget=1.0, lag=3, sinks=2"), "qfilter": ("budget=6", "budget=1.0"),
    "finch": ("budget=6, window=3", "budget=64, window=3"), "chunkkv": ("budget=6, chunk=2", "budget=1.0, chunk=2"),
    "keyformer": ("budget=8, window=2", "budget=64"), "scissorhands": ("budget=9, window=3", "budget=64"),
    "kvzip": ("budget=0.5, chunk=8", "budget=1.0"),
}
AUDIT_CASES = ([(n, f"evict(score='{n}', {lossy})", f"evict(score='{n}', {exact})") for n, (lossy, exact) in AUDIT.items()]
               + [(p.name, p.examples["lossy"], p.examples["exact"]) for p in (SnapKV, H2O)])
LOWRANK, STEER = "lowrank_kv(keep=0.5)", "steer(heads={0: [1]}, alpha=0.05)"
EMPHASIS = [[(2, 6)], [(1, 4)]]


def test_the_audit_lists_every_score():
    from graphwright.ops.scorers import CHUNKKV, SCORERS

    assert set(AUDIT) == set(SCORERS) | {CHUNKKV} | set(DELEGATES)


def _audit_model(recipe):
    return CompiledModel(run_recipe(_compiled("tiny-llama").step_graph, recipe, verify=False)[0])


@pytest.mark.parametrize("other", ["lowrank_kv", "steer"])
@pytest.mark.parametrize("name,lossy,exact", AUDIT_CASES, ids=[c[0] if c[1].startswith("evict") else f"{c[0]}-pass"
                                                             for c in AUDIT_CASES])
def test_every_score_composes_with_lowrank_kv_and_steer(name, lossy, exact, other):
    compose = (lambda e: f"{LOWRANK} + {e}") if other == "lowrank_kv" else (lambda e: f"{e} + {STEER}")
    # steering's emphasis spans index the prompt; KVzip's replay runs past it and refuses extra inputs (its own test)
    emphasis = EMPHASIS if other == "steer" and name != "kvzip" else None
    ids, mask = left_padded_batch(256, LENGTHS, seed=8)
    gen = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=[], emphasis=emphasis)
    cm = _audit_model(compose(lossy))
    assert cm.generate(ids, **gen).shape == (2, 14 + 8)
    kept = cm.last_stats["kept_tokens_per_head"]
    assert min(int(h) for layer in kept for h in layer[0]) < 14 + 7  # row 0 lost tokens: it evicted
    base, ex = _audit_model(LOWRANK if other == "lowrank_kv" else STEER), _audit_model(compose(exact))
    assert torch.equal(ex.generate(ids, **gen), base.generate(ids, **gen))
    (la, ta, _), (lb, tb, _) = decode_loop(ex, ids, mask, 8), decode_loop(base, ids, mask, 8)
    assert torch.equal(ta, tb) and (la - lb).abs().max() <= 1e-4


@pytest.mark.parametrize("recipe", ["evict(score='h2o', budget=6, window=2) + steer(heads='all', alpha=0.05)",
                                    "evict(score='qfilter', budget=0.5) + steer(heads='all', alpha=0.05)",
                                    "evict(score='finch', budget=0.5, window=2, chunk=4) + steer(heads='all', alpha=0.05)"])
def test_more_settings_compose_with_steer(recipe):
    """Variants past the audit's one setting per score: fraction budgets, Finch's chunks, steering every head."""
    new, _, verification = run_recipe(_compiled("tiny-llama").step_graph, recipe)
    cm = CompiledModel(new)
    ids, mask = left_padded_batch(256, LENGTHS, seed=8)
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert out.shape == (2, 14 + 8) and "evict" in new.notes
    kept = cm.last_stats["kept_tokens_per_head"]
    assert max(h for layer in kept for row in layer for h in row) < 14 + 8


@pytest.mark.parametrize("recipe,op", [("evict(score='knorm', budget=6)", "graphwright::evict_scored"),
                                       ("evict(score='criticalkv', budget=6)", "graphwright::evict_scored_wo")])
def test_compiled_backend_runs_it_with_an_eager_fallback(recipe, op):
    """The compiled backend runs the scored op eagerly after its decode graph (``codegen/torch/static_fallback.py``;
    the cases there compare every step): the torch backend's tokens."""
    sg, _, _ = run_recipe(_compiled("tiny-llama").step_graph, recipe, verify=False)
    cm, ref = CompiledModel(sg, recipe=recipe, backend="compiled"), CompiledModel(sg, recipe=recipe)
    cm._backend_step.compiler = lambda gm: gm  # the decode graph eagerly (Inductor: tests/codegen/test_compiled_fallback.py)
    ids, mask = left_padded_batch(256, LENGTHS, seed=8)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), want)
    assert [r["op"].name() for r in cm._backend_step.fallback["records"]] == [op] * 2


@pytest.mark.parametrize("args,msg", [
    (dict(score="snapkv", budget=6, when="decode"), "runs only when='prefill'"),
    (dict(score="expected_attention", budget=6, when="every:4"), "runs only when='prefill'"),
    (dict(score="knorm", budget=6, pool="max"), "pool= is not read by score='knorm'"),
    (dict(score="tova", budget=6, kernel=3), "kernel= is not read"),
    (dict(score="knorm", budget=6, when="every:0"), "N in 'every:N' must be an integer >= 1"),
    (dict(score="knorm", budget=6, when="sometimes"), "allowed: 'prefill', 'decode'"),
    (dict(score="knorm", budget=6, when="prefill", every=3), "contradicts when='prefill'"),
    (dict(score="knorm", budget=6, slack=2), "slack applies to when='overflow'"),
    (dict(score="tova", budget=6, when="prefill", rule="adaptive"), "rule=.adaptive. needs per-head scores"),
    (dict(score="knorm", budget=6, beta=4.0), "beta applies to rule='pyramid'"),
    (dict(score="knorm", budget=0), "budget=0 must be > 0"),
    (dict(score="knorm", budget=4, sinks=2, window=3), "exceed budget=4"),
    (dict(score="nosuchscorer", budget=4), "must be one of"),
    (dict(budget=4), "'score' is required"),
])
def test_bad_arguments_are_refused(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)


def test_expected_attention_on_latent_layers_reads_the_value_up_projection():
    """Both value paths: the op rebuilds per-head values from B_V (reconstruct: the attention's v_up; absorbed: the
    parameter lowrank_kv keeps); the same kept sets either way, since both hold the same latent rows."""
    ids, mask = left_padded_batch(256, LENGTHS, seed=12)
    seen = []
    for path in ("absorbed", "reconstruct"):
        cm = _audit_model(f"lowrank_kv(keep=0.5, value_path='{path}') + evict(score='expected_attention', budget=6)")
        ops = [n for n in cm.step_graph.gm.graph.nodes if "evict_scored_rope_values" in str(n.target)]
        assert len(ops) == cm.info.num_layers
        seen.append(kept_every_step(cm, ids, mask, 3)[0])
    assert seen[0] == seen[1]
    assert all(len(h) < 14 for h in seen[0][0][0][0])  # evicted after prefill


def test_criticalkv_on_latent_layers_needs_the_absorbed_value_path():
    """CriticalKV multiplies the latent rows by the absorbed o_proj (W_O B_V^T): with value_path='reconstruct' o_proj
    is the original one, so the latent layers are refused with the reason."""
    with pytest.raises(RecipeError, match="value_path='absorbed'"):
        _audit_model("lowrank_kv(keep=0.5, value_path='reconstruct') + evict(score='criticalkv', budget=6)")


def test_a_delegate_is_one_table_entry(monkeypatch):
    monkeypatch.setitem(DELEGATES, "snapkv_preset", lambda a: SnapKV(budget=a["budget"]))
    monkeypatch.setattr(Evict, "args", tuple(
        a if a.name != "score" else type(a)(**{**a.__dict__, "choices": a.choices + ("snapkv_preset",)}) for a in Evict.args))
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=9)
    a = run_pass(cm, Evict(score="snapkv_preset", budget=7))
    b = run_pass(cm, SnapKV(budget=7))
    assert torch.equal(decode_loop(a, ids, mask, 3)[0], decode_loop(b, ids, mask, 3)[0])


def test_pyramid_rule_with_snapkv_gives_snapkv_pyramid_logits():
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, [30, 24], seed=10)
    a = run_pass(cm, Evict(score="snapkv", budget=10, window=3, rule="pyramid", beta=4.0))
    b = run_pass(cm, SnapKV(budget=10, window=3, pyramid=4.0))
    la, ta, _ = decode_loop(a, ids, mask, 6)
    lb, tb, _ = decode_loop(b, ids, mask, 6)
    dense_logits = decode_loop(cm, ids, mask, 6)[0]
    assert torch.equal(ta, tb) and (la - lb).abs().max() <= 1e-4
    assert (la[1:] - dense_logits[1:]).abs().max() > 1e-3  # it did evict


@pytest.mark.parametrize("recipe, preset", [
    ("evict(score='keyformer', budget=8, window=2)", "keyformer(kv=8, recent=0.25)"),
    ("evict(score='keyformer', budget=0.5)", "keyformer(kv=0.5)"),
    ("evict(score='scissorhands', budget=9, window=3, sinks=1)", "scissorhands(budget=9, recent=3, sinks=1)"),
])
def test_keyformer_and_scissorhands_are_evict_scores(recipe, preset):
    """The DELEGATES entries: evict(score=...) runs the policy's own pass with mapped arguments (same tokens)."""
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=11)
    a, b = (CompiledModel(run_recipe(cm.step_graph.copy(), r, verify=False)[0]) for r in (recipe, preset))
    (la, ta, sa), (lb, tb, sb) = decode_loop(a, ids, mask, 6), decode_loop(b, ids, mask, 6)
    assert torch.equal(la, lb) and torch.equal(ta, tb)
    assert [tuple(t.shape) for t in sa] == [tuple(t.shape) for t in sb]
    assert (la - decode_loop(cm, ids, mask, 6)[0]).abs().max() > 1e-3  # it really evicts


@pytest.mark.parametrize("recipe, match", [
    ("evict(score='keyformer', budget=8, chunk=4)", "does not read"),
    ("evict(score='keyformer', budget=8, when='prefill')", "runs when='decode'"),
    ("evict(score='keyformer', budget=8, window=0.5)", "same kind"),
    ("evict(score='scissorhands', budget=0.5)", "int budget"),
    ("evict(score='scissorhands', budget=9, rule='pyramid')", "does not read"),
])
def test_delegated_scores_refuse_what_they_do_not_read(recipe, match):
    with pytest.raises(RecipeError, match=match):
        run_recipe(_compiled("tiny-llama").step_graph, recipe, verify=False)
