"""The ``steer`` pass (PASTA): exact setting, closed-form oracle T(A), untouched heads, decode columns."""

from __future__ import annotations

import math

import pytest
import torch

import graphwright as gw
from graphwright.errors import RecipeError
from graphwright.steer.bias import STEER_INPUT
from tests.steer.helpers import closed_form, probs, record_attention

STEERED = {1: [0, 2]}  # layer 1 only: layer 0 is unsteered, so layer 1 sees the base model's q/k/v


@pytest.fixture(scope="module")
def models():
    m, _ = gw.load_model("tiny-llama")
    base = gw.compile(m, backend="reference")
    steered = gw.compile(m, recipe=f"steer(alpha=0.05, heads={STEERED})",
                         backend="reference")
    return m, base, steered


def _ids(n, seed=0, vocab=256):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _scaled_columns(call, n_prompt, spans):
    """[B, S] True where PASTA scales a key column: a prompt position outside every span."""
    kp = call["k_pos"]
    inside = torch.zeros_like(kp, dtype=torch.bool)
    for s, e in spans:
        inside |= (kp >= s) & (kp < e)
    return (kp >= 0) & (kp < n_prompt) & ~inside


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3", "tiny-gpt2", "tiny-qwen2"])
def test_alpha_one_is_identity_logits_and_tokens(name, tiny, compiled_tiny):
    base = compiled_tiny(name)
    cm = gw.compile(tiny(name), recipe="steer(alpha=1.0, heads='all')")
    ids = _ids(11, seed=1)
    ref = base.logits(ids)
    got = cm.logits(ids, emphasis=[(2, 6)])
    assert torch.equal(got, ref) or (got - ref).abs().max() < 1e-5
    assert torch.equal(cm.generate(ids, max_new_tokens=6, emphasis=[(2, 6)]), base.generate(ids, max_new_tokens=6))


def test_steering_changes_logits_and_no_emphasis_is_base(models):
    _, base, cm = models
    ids = _ids(12)
    ref = base.logits(ids)
    assert torch.equal(cm.logits(ids), ref)  # no emphasis: the graph runs the unbiased path
    assert torch.equal(cm.logits(ids, emphasis=[]), ref)  # an empty span list is no emphasis too
    assert (cm.logits(ids, emphasis=[(3, 7)]) - ref).abs().max() > 1e-3


def test_selected_heads_match_closed_form_and_others_bit_identical(models):
    _, base, cm = models
    ids, spans, alpha = _ids(12, seed=2), [(3, 7)], 0.05
    with record_attention(base) as b_calls:
        base.logits(ids)
    with record_attention(cm) as s_calls:
        cm.logits(ids, emphasis=spans)
    assert len(s_calls) == 2
    # layer 0 is not steered: no bias at all, outputs bit-identical to the base
    assert s_calls[0]["key_bias"] is None and torch.equal(s_calls[0]["out"], b_calls[0]["out"])
    sc, bc = s_calls[1], b_calls[1]
    assert torch.equal(sc["q"], bc["q"]) and torch.equal(sc["k"], bc["k"])
    P_base, P_steer = probs(bc), probs(sc)
    others = [h for h in range(4) if h not in STEERED[1]]
    assert torch.equal(P_steer[:, others], P_base[:, others])
    assert torch.equal(sc["out"][:, others], bc["out"][:, others])
    T = closed_form(P_base[:, STEERED[1]], _scaled_columns(sc, 12, spans), alpha)
    torch.testing.assert_close(P_steer[:, STEERED[1]].double(), T, atol=1e-6, rtol=1e-5)
    # the op's output is T(A) V (the oracle goes through the real op, not the helper)
    g = sc["q"].shape[1] // sc["v"].shape[1]
    v = sc["v"].double().repeat_interleave(g, dim=1)[:, STEERED[1]]
    torch.testing.assert_close(sc["out"][:, STEERED[1]].double(), T @ v, atol=1e-5, rtol=1e-4)
    # emphasized columns gain mass in steered heads
    inside = P_steer[:, STEERED[1], :, 3:7].sum(-1)[..., 7:]
    assert (inside > P_base[:, STEERED[1], :, 3:7].sum(-1)[..., 7:]).all()


def test_decode_steps_keep_generated_columns_unscaled(models):
    _, _, cm = models
    ids, spans, alpha, n = _ids(9, seed=3), [(1, 4)], 0.05, 9
    with record_attention(cm) as calls:
        out = cm.generate(ids, max_new_tokens=4, emphasis=spans)
    assert out.shape[1] == 13
    decode = [c for c in calls if c["layer"] == 1 and c["q"].shape[2] == 1]
    assert len(decode) == 3
    log_a = math.log(alpha)
    for c in decode:
        kp, kb = c["k_pos"], c["key_bias"]
        assert (kp >= n).any()  # generated tokens are visible keys
        gen = (kp >= n)[:, None, :].expand_as(kb)
        assert torch.equal(kb[gen], torch.zeros_like(kb[gen]))  # never scaled
        expect = torch.where(_scaled_columns(c, n, spans), log_a, 0.0)
        for h in range(4):
            assert torch.equal(kb[:, h], expect if h in STEERED[1] else torch.zeros_like(expect))
        A = probs(c, bias=False)[:, STEERED[1]]
        torch.testing.assert_close(probs(c)[:, STEERED[1]].double(), closed_form(A, _scaled_columns(c, n, spans), alpha),
                                   atol=1e-6, rtol=1e-5)


def test_include_inverse_alpha_equals_exclude(tiny):
    m = tiny("tiny-llama")
    exc = gw.compile(m, recipe="steer(alpha=0.1, heads='all', mode='exclude')")
    inc = gw.compile(m, recipe="steer(alpha=10.0, heads='all', mode='include')")
    ids = _ids(10, seed=4)
    a, b = exc.logits(ids, emphasis=[(2, 5)]), inc.logits(ids, emphasis=[(2, 5)])
    assert (a - exc.logits(ids)).abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(exc.generate(ids, max_new_tokens=5, emphasis=[(2, 5)]), inc.generate(ids, max_new_tokens=5, emphasis=[(2, 5)]))
    # include with alpha < 1 *de*-emphasizes the span, as in the paper's code
    inc_small = gw.compile(m, recipe="steer(alpha=0.1, heads='all', mode='include')")
    exc_big = gw.compile(m, recipe="steer(alpha=10.0, heads='all', mode='exclude')")
    torch.testing.assert_close(inc_small.logits(ids, emphasis=[(2, 5)]), exc_big.logits(ids, emphasis=[(2, 5)]), atol=1e-5, rtol=1e-5)


def test_torch_backend_matches_reference(tiny):
    m = tiny("tiny-mistral")
    ref = gw.compile(m, recipe="steer(alpha=0.01, heads={0: [1], 1: [0, 3]})", backend="reference")
    sdpa = gw.compile(m, recipe="steer(alpha=0.01, heads={0: [1], 1: [0, 3]})", backend="torch")
    ids = _ids(14, seed=5)
    torch.testing.assert_close(sdpa.logits(ids, emphasis=[(0, 3), (8, 12)]), ref.logits(ids, emphasis=[(0, 3), (8, 12)]),
                               atol=1e-5, rtol=1e-5)


def test_notes_report_and_graph(models):
    _, _, cm = models
    notes = cm.step_graph.notes["steer"]
    assert notes["counts"] == {"layers_steered": 1, "heads_steered": 2, "heads_total": 8}
    assert notes["per_layer"] == {1: {"heads": [0, 2]}}
    assert notes["settings"]["log_alpha"] == pytest.approx(math.log(0.05))
    assert [x.name for x in cm.step_graph.extra_inputs] == [STEER_INPUT]
    assert torch.equal(cm.graph.steer_coef_1, torch.tensor([math.log(0.05), 0, math.log(0.05), 0]))
    variants = {n.meta["graphwright"]["layer"]: n.meta["graphwright"].get("variant")
                for n in cm.graph.graph.nodes if n.target is torch.ops.graphwright.attention.default}
    assert variants[1] == "steered" and variants[0] != "steered"
    text = str(cm.report().rows)
    assert "steer" in str(cm.report().columns) and "0" in text


@pytest.mark.parametrize("recipe, needle", [
    ("steer(heads={9: [0]})", "steer: layer 9 is out of range (valid layers are 0..1 (2 layers), heads 0..3)"),
    ("steer(heads={0: [4]})", "head 4 of layer 0 is out of range"),
    ("steer(heads={})", "the head set is empty"),
    ("steer(heads='nope.json')", "neither 'all', 'auto', nor an existing JSON head-set file"),
    ("steer(heads='all', mode='both')", "must be one of ['exclude', 'include']"),
    ("steer(heads='all', alpha=0)", "out of range"),
    ("steer", "argument 'heads' is required"),
    ("steer(heads='all') + steer(heads='all')", "steer is in the recipe twice"),
])
def test_bad_recipes_raise(tiny, recipe, needle):
    with pytest.raises(RecipeError) as err:
        gw.compile(tiny("tiny-llama"), recipe=recipe)
    assert needle in str(err.value)
