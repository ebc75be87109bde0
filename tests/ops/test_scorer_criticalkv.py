"""CriticalKV (arXiv 2502.03805) through the registered ``evict_scored_wo`` op against a loop oracle on random
attention, values and output projections; ``first=1`` is SnapKV; the pass reads each layer's own o_proj weight."""

from __future__ import annotations

import math

import pytest
import torch

from graphwright import RecipeError
from graphwright.ops import schema
from graphwright.ops.policy_scored import SCORED_WO_POLICY
from graphwright.passes.evict import Evict
from tests.conftest import _compiled
from tests.ops.scorer_oracles import DEFAULTS, call_op, kept, prefill_step, select_oracle, snapkv_oracle
from tests.passes.eviction_helpers import run_pass

SCALE = 0.35


def _call(q, k, v, q_pos, k_pos, wo, first, **params):
    args = dict(DEFAULTS, scorer="criticalkv", when="prefill", kernel=3, **params)
    return SCORED_WO_POLICY.op(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, wo=wo, scale=SCALE, first=first, **args)


def _vo_norm(v, wo, b, h, s, g):
    """Mean over KV head h's g query heads qh of sum_o |sum_d v[b, h, s, d] wo[o, qh * D + d]|."""
    D = v.shape[-1]
    tot = 0.0
    for j in range(g):
        qh = h * g + j
        tot += sum(abs(sum(float(v[b, h, s, d]) * float(wo[o, qh * D + d]) for d in range(D))) for o in range(wo.shape[0]))
    return tot / g


def _oracle(q, k, v, q_pos, k_pos, wo, window, kernel, budget_n, budget_f, first, eps):
    """[B][Hk] kept positions by loops: ``select_oracle`` with a two-stage score: stage 1 (the top
    floor(first * budget) - window by mean window attention) scores +inf, every other evictable token
    (a + eps) * mean over the KV head's query heads of ||v W_O,h^T||_1."""
    B, H, T, D = q.shape
    Hk = k.shape[1]
    g = H // Hk
    a_sum = snapkv_oracle(q, k, q_pos, k_pos, SCALE, window, kernel)
    score = []
    for b in range(B):
        L = max(int(p) for p in q_pos[b]) + 1
        cap = budget_n + math.floor(budget_f * L + 1e-9)
        rows = []
        for h in range(Hk):
            cand = [s for s in range(T) if 0 <= k_pos[b, h, s] < L - window]
            a = {s: a_sum[b][h][s] / window for s in cand}
            m = max(0, math.floor(first * cap) - (L - len(cand)))
            stage1 = set(sorted(cand, key=lambda s: (-a[s], s))[:m])
            rows.append([math.inf if s in stage1 else (a[s] + eps) * _vo_norm(v, wo, b, h, s, g) if s in a else 0.0
                         for s in range(T)])
        score.append(rows)
    return select_oracle(score, k_pos, q_pos, budget_n, budget_f, window=window)


@pytest.mark.parametrize("budget_n,budget_f", [(7, 0.0), (0, 0.6)])
@pytest.mark.parametrize("first,eps", [(0.5, 1e-4), (0.3, 0.5), (0.0, 1e-4)])
def test_kept_sets_match_the_loop_oracle(budget_n, budget_f, first, eps):
    q, k, v, q_pos, k_pos = prefill_step(T=14, seed=4)
    wo = torch.randn(6, 4 * 8, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.2, 3.0, 32)
    out = _call(q, k, v, q_pos, k_pos, wo, first, budget_n=budget_n, budget_f=budget_f, window=3, eps=eps)
    want = _oracle(q, k, v, q_pos, k_pos, wo, 3, 3, budget_n, budget_f, first, eps)
    assert kept(out[2]) == want
    # the value norm matters: SnapKV alone keeps other sets here
    snap = call_op(q, k, v, q_pos, k_pos, scorer="snapkv", when="prefill", kernel=3, window=3, budget_n=budget_n,
                   budget_f=budget_f)
    if first == 0.0:
        assert kept(snap[2]) != want


def test_first_one_keeps_snapkv_sets():
    q, k, v, q_pos, k_pos = prefill_step(T=14, seed=6)
    wo = torch.randn(6, 32, generator=torch.Generator().manual_seed(7))
    got = _call(q, k, v, q_pos, k_pos, wo, 1.0, budget_n=6, window=2)
    snap = call_op(q, k, v, q_pos, k_pos, scorer="snapkv", when="prefill", kernel=3, window=2, budget_n=6)
    assert kept(got[2]) == kept(snap[2]) != kept(k_pos)


def test_the_pass_reads_each_layers_o_proj_weight():
    cm = _compiled("tiny-llama")
    ev = run_pass(cm, Evict(score="criticalkv", budget=6))
    nodes = [n for n in ev.step_graph.gm.graph.nodes if n.target == SCORED_WO_POLICY.op]
    assert len(nodes) == cm.info.num_layers
    for layer, n in enumerate(nodes):
        a = schema.bound(n)
        wo = a["wo"]
        assert wo.op == "get_attr" and "o_proj" in str(wo.target) and f".{layer}." in str(wo.target)
        assert a["first"] == 0.5 and a["eps"] == 1e-4 and a["window"] == 3


@pytest.mark.parametrize("args,msg", [
    (dict(score="snapkv", budget=6, first=0.5), "first= is not read by score='snapkv'"),
    (dict(score="criticalkv", budget=6, chunk=4), "ChunkKV selects whole chunks"),
    (dict(score="criticalkv", budget=6, when="decode"), "runs only when='prefill'"),
    (dict(score="knorm", budget=6, eps=0.1), "eps= is not read by score='knorm'"),
])
def test_bad_arguments_are_refused(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)


def test_latent_layers_with_a_value_bias_are_refused():
    """On latent layers CriticalKV reads c_v through the absorbed o_proj; a value bias (Qwen2's v_proj has one) is
    folded into o_proj's bias, outside the per-token norm, so those layers are refused with the reason (latent layers
    without one run: ``tests/ops/test_scorer_latent_values.py``)."""
    from graphwright.verify import run_recipe

    with pytest.raises(RecipeError, match="no value bias"):
        run_recipe(_compiled("tiny-qwen2").step_graph, "lowrank_kv(keep=0.5) + evict(score='criticalkv', budget=6)")
