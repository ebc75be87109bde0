"""The pass manager (``passes/manager.py``): recipes are ordered from the passes' declarations.

Every permutation of a recipe gets one order and identical logits; conflicts are a RecipeError
naming both passes, raised before any pass runs; the order and its reasons are in the report.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import graphwright as gw
from graphwright import RecipeError
from graphwright.passes.base import PASS_REGISTRY, Pass, instantiate
from graphwright.passes.manager import FACTS, order_passes
from graphwright.recipes import Recipe
from tests.conftest import _tiny
from tests.passes.registry_examples import prompt, registered


def test_every_declared_fact_is_in_the_vocabulary():
    for name in registered():
        cls = PASS_REGISTRY[name]
        used = cls.needs | cls.produces | cls.removes | cls.forbids | set(cls.excludes)
        assert used <= set(FACTS), (name, used - set(FACTS))


def test_three_passes_every_permutation_same_order_and_logits():
    parts = ["steer(heads={0: [1]}, alpha=0.01)", "h2o(heavy=4, recent=4)", "lowrank_kv(keep=0.6)"]
    ids, mask = prompt()
    emphasis = [[(1, 6)], [(6, 9)]]
    seen = []
    for perm in itertools.permutations(parts):
        cm = gw.compile(_tiny("tiny-llama"), recipe=" + ".join(perm))
        order = cm.step_graph.notes["pass_order"]
        assert order["written"] == [p.split("(")[0] for p in perm]
        seen.append((order["order"], cm.logits(ids, attention_mask=mask, emphasis=emphasis)))
    assert all(o == ["lowrank_kv", "h2o", "steer"] for o, _ in seen)
    assert all(torch.equal(seen[0][1], logits) for _, logits in seen[1:])
    report = str(cm.report())
    assert "lowrank_kv -> h2o -> steer" in report and "h2o must see the layer before ['key_bias']" in report


class Exploding(Pass):
    """A pass whose run() must never be reached: conflicts are found before surgery."""

    name = "test_exploding"
    produces = frozenset({"evicted"})
    examples = {"exact": None, "lossy": None, "models": ()}

    def run(self, sg, ctx):
        raise AssertionError("graph surgery started before the conflict was found")


def test_conflict_is_found_before_any_pass_runs():
    PASS_REGISTRY[Exploding.name] = Exploding
    try:
        with pytest.raises(RecipeError, match=r"test_exploding \+ h2o: h2o and test_exploding cannot share a layer: "
                                              r"one eviction policy per layer"):
            gw.compile(_tiny("tiny-llama"), recipe="test_exploding + h2o(heavy=4, recent=4)")
    finally:
        PASS_REGISTRY.pop(Exploding.name)


def test_disjoint_layers_combine_two_policies_and_refusal_names_overlap():
    cm = gw.compile(_tiny("tiny-llama"), recipe="streaming(sinks=2, window=6, layers=[1]) + h2o(heavy=4, recent=4, layers=[0])")
    assert cm.step_graph.notes["pass_order"]["order"] == ["h2o", "streaming"]
    ids, mask = prompt()
    assert cm.generate(ids, attention_mask=mask, max_new_tokens=4).shape == (2, ids.shape[1] + 4)
    with pytest.raises(RecipeError, match=r"both apply to layer\(s\) \[1\]"):
        gw.compile(_tiny("tiny-llama"), recipe="streaming(layers=[1]) + h2o(layers=[0, 1])")


def test_model_level_need_is_refused_naming_it():
    with pytest.raises(RecipeError, match=r"fuse_moe needs \['moe_experts'\]"):
        gw.compile(_tiny("tiny-llama"), recipe="fuse_moe + h2o")


def test_cycle_is_a_recipe_error():
    class A(Pass):
        name = "test_a"
        needs = frozenset({"window"})
        removes = frozenset({"key_bias"})
        produces = frozenset({"key_bias"})

    class B(Pass):
        name = "test_b"
        needs = frozenset({"key_bias"})
        removes = frozenset({"window"})
        produces = frozenset({"window"})

    sg = gw.capture(_tiny("tiny-llama"))
    with pytest.raises(RecipeError, match="each must run before the other"):
        order_passes([A(), B()], sg)


def test_order_is_a_pure_function_of_the_set():
    sg = gw.capture(_tiny("tiny-llama"))
    recipe = Recipe.parse("window(size=8) + snapkv(budget=6, window=2) + lowrank_kv(keep=0.5) + steer(heads={1: [0]})")
    orders = {tuple(p.name for p in order_passes(list(perm), sg).passes)
              for perm in itertools.permutations(instantiate(recipe))}
    assert orders == {("window", "lowrank_kv", "snapkv", "steer")}
