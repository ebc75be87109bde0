"""``run_recipe``: passes run on copies, leave notes, and are verified on a probe input."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright import GraphwrightError, RecipeError
from graphwright.passes.base import PASS_REGISTRY, Arg, Pass
from graphwright.passes.pipeline import CALIBRATION_TOKENS, calibration_ids
from graphwright.verify import make_probe, probe_logits, run_recipe


@pytest.fixture(scope="module")
def sg():
    """One captured tiny-llama step graph for the module; tests only ever rewrite copies of it."""
    return gw.capture(gw.load_model("tiny-llama")[0])


@pytest.fixture
def register():
    """register(cls) puts a test-only pass into PASS_REGISTRY; all are removed afterwards."""
    added = []

    def _register(cls):
        PASS_REGISTRY[cls.name] = cls
        added.append(cls.name)
        return cls

    yield _register
    for name in added:
        PASS_REGISTRY.pop(name, None)


def perturb_one_weight(sg, scale: float = 0.05):
    """Point layer 0's down projection at a perturbed copy (a new buffer on this copy only)."""
    node = next(n for n in sg.gm.graph.nodes if n.op == "get_attr" and n.target.endswith("layers.0.mlp.down_proj.weight"))
    weight = sg.gm.get_parameter(node.target)
    sg.gm.register_buffer("test_perturbed_weight", weight.detach() + scale)
    node.target = "test_perturbed_weight"
    sg.gm.recompile()
    return sg


class WrongExact(Pass):
    name = "test_wrong_exact"
    exact = True

    def run(self, sg, ctx):
        return perturb_one_weight(sg)


class Lossy(Pass):
    name = "test_lossy"
    args = (Arg("scale", float, 0.05, min=0.0),)

    def is_identity(self):
        return self.scale == 0.0

    def run(self, sg, ctx):
        sg.notes["test_lossy"] = {"per_layer": {0: {"scale": self.scale}}, "counts": {"perturbed": 1}}
        return perturb_one_weight(sg, self.scale)


class MoeOnly(Pass):
    name = "test_moe_only"

    def applies_to(self, sg):
        return None if sg.info.is_moe else "it has no MoE blocks to fuse"

    def run(self, sg, ctx):  # pragma: no cover - never reached on a dense model
        return sg


def test_compile_with_noop_records_notes_and_verification(tiny):
    cm = gw.compile(tiny("tiny-llama"), recipe="noop")
    assert cm.recipe == gw.Recipe.parse("noop") and str(cm.recipe) == "noop"
    notes = cm.step_graph.notes
    assert notes["noop"] == {"per_layer": {0: {"visited": True}, 1: {"visited": True}}, "counts": {"attention_nodes": 2}}
    assert notes["recipe"] == [{"pass": "noop"}]
    assert cm.verification["passes"] == [{"name": "noop", "exact": True, "max_abs_logit_diff": 0.0, "kl": 0.0,
                                          "decode_max_abs_logit_diff": 0.0, "decode_kl": 0.0, "kv_kept": 1.0}]
    assert cm.verification["probe"] == {"batch": 2, "prompt_tokens": 16, "decode_steps": 4, "left_padding": 3, "uncrossed": {}}
    assert cm.verification["backend"] == "torch" and "fallback" not in cm.verification
    assert cm.verification["lowering"]["max_abs_logit_diff"] <= 1e-4  # torch kernels vs the reference backend


def test_identity_recipe_leaves_the_graph_alone(sg):
    out, recipe, verification = run_recipe(sg, None)
    assert out is sg and recipe == gw.Recipe() and verification["passes"] == [] and verification["backend"] == "torch"


def test_wrong_exact_pass_raises_and_leaves_the_input_intact(sg, register):
    register(WrongExact)
    probe = make_probe(sg)
    before = probe_logits(sg, probe)
    msg = r"pass test_wrong_exact is exact but changed the probe logits by [0-9.e-]+ \(tolerance 0.0001 for float32\)"
    with pytest.raises(GraphwrightError, match=msg):
        run_recipe(sg, "noop + test_wrong_exact")
    assert "recipe" not in sg.notes and "noop" not in sg.notes
    assert torch.equal(probe_logits(sg, probe), before)


def test_verify_false_skips_the_check(sg, register):
    register(WrongExact)
    out, _, verification = run_recipe(sg, "test_wrong_exact", verify=False)
    assert out is not sg
    assert verification == {"passes": [{"name": "test_wrong_exact", "exact": True, "max_abs_logit_diff": None, "kl": None}]}


def test_lossy_pass_reports_its_deviation(sg, register):
    register(Lossy)
    out, recipe, verification = run_recipe(sg, [{"pass": "test_lossy", "scale": 0.05}, {"pass": "noop"}])
    noop, lossy = verification["passes"]  # the pass manager runs noop (stage 0) first, whatever the written order
    assert lossy["name"] == "test_lossy" and lossy["exact"] is False
    assert lossy["max_abs_logit_diff"] > 1e-3 and lossy["kl"] > 0
    assert noop == {"name": "noop", "exact": True, "max_abs_logit_diff": 0.0, "kl": 0.0,
                    "decode_max_abs_logit_diff": 0.0, "decode_kl": 0.0, "kv_kept": 1.0}
    assert out.notes["recipe"] == [{"pass": "noop"}, {"pass": "test_lossy", "scale": 0.05}]
    assert out.notes["pass_order"]["written"] == ["test_lossy", "noop"]
    assert out.notes["pass_order"]["order"] == ["noop", "test_lossy"]
    assert out.notes["test_lossy"]["counts"] == {"perturbed": 1}


def test_lossy_pass_at_its_exact_setting_is_checked(sg, register):
    register(Lossy)
    _, _, verification = run_recipe(sg, "test_lossy(scale=0.0)")
    assert verification["passes"][0]["exact"] is True and verification["passes"][0]["max_abs_logit_diff"] == 0.0


def test_pass_that_does_not_apply(sg, register):
    register(MoeOnly)
    with pytest.raises(RecipeError, match="pass test_moe_only does not apply to LlamaForCausalLM: it has no MoE blocks to fuse"):
        run_recipe(sg, "noop + test_moe_only")


def test_bad_recipes_fail_before_any_work(sg):
    with pytest.raises(RecipeError, match="unknown pass 'nope'"):
        run_recipe(sg, "noop + nope")
    with pytest.raises(RecipeError, match="offset 5"):
        run_recipe(sg, "noop(")


def test_pass_returning_none(sg, register):
    class ReturnsNone(Pass):
        name = "test_returns_none"
        exact = True

        def run(self, sg, ctx):
            return None

    register(ReturnsNone)
    with pytest.raises(GraphwrightError, match="pass test_returns_none returned None"):
        run_recipe(sg, "test_returns_none")


class FakeTokenizer:
    """Whitespace 'tokenizer': enough to check the calibration plumbing without a real vocabulary."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + len(w) for w in text.split()]}


def test_context_gets_model_tokenizer_and_calibration_ids(sg, register, tiny):
    seen = {}

    class Spy(Pass):
        name = "test_spy"
        exact = True

        def run(self, sg, ctx):
            seen.update(model=ctx.model, tokenizer=ctx.tokenizer, ids=ctx.calibration_ids)
            return sg

    register(Spy)
    model, tok = tiny("tiny-llama"), FakeTokenizer()
    run_recipe(sg, "test_spy", model=model, tokenizer=tok, verify=False)
    assert seen["model"] is model and seen["tokenizer"] is tok
    assert seen["ids"].shape == (1, CALIBRATION_TOKENS) and seen["ids"].dtype == torch.long
    assert torch.equal(seen["ids"], calibration_ids(tok))  # the same text every time
    run_recipe(sg, "test_spy", verify=False)
    assert seen["ids"] is None  # no tokenizer, no calibration text


def test_probe_shape_and_padding(sg):
    probe = make_probe(sg)
    ids, mask = probe.ids, probe.mask
    assert ids.shape == mask.shape == (2, 16 + 4) and probe.prefill == 16 and probe.decode == 4
    assert mask[0].all() and mask[1, :3].eq(0).all() and mask[1, 3:].all()
    assert int(ids[mask.bool()].min()) >= 3 and int(ids.max()) < sg.info.vocab_size
    assert torch.equal(make_probe(sg).ids, ids)  # seeded
