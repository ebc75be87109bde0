"""tiny-qwen3 (per-head q/k RMSNorm before RoPE, head_dim apart from hidden / heads): identity equals
HF, ``lowrank_kv`` keeps the key norm (exact at full rank, error shrinking to zero as rank grows), and
every registered pass either applies with its exact setting reproducing dense or is refused with a
reason -- issue 22 item 1."""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.compiled import CompiledModel
from graphwright.errors import RecipeError
from graphwright.verify import run_recipe
from tests.conftest import hf_positions, left_padded_batch
from tests.passes.registry_examples import examples, registered

NAME = "tiny-qwen3"
LENGTHS = [20, 13]
NEW = 12
GEN = dict(max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)


def apply(cm, recipe):
    sg, _, _ = run_recipe(cm.step_graph, recipe, verify=False)
    return CompiledModel(sg)


def test_identity_matches_hf_and_the_norms_matter(tiny, compiled_tiny):
    m, cm = tiny(NAME), compiled_tiny(NAME)
    k_norm = m.model.layers[0].self_attn.k_norm.weight
    assert (k_norm - 1).abs().max() > 0.1  # seeded away from 1, so dropping the norm would show
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    want = m(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert (cm.logits(ids, mask) - want)[mask.bool()].abs().max() <= 1e-4
    want_tokens = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(cm.generate(ids, attention_mask=mask, **GEN), want_tokens)


def test_lowrank_rank_sweep_keeps_the_key_norm_and_goes_to_zero_at_full_rank(compiled_tiny):
    ids, mask = left_padded_batch(256, LENGTHS, seed=3)
    base = compiled_tiny(NAME)
    dense = base.logits(ids, mask)[mask.bool()]
    err = {}
    for keep in (0.25, 0.5, 0.75, 1.0):
        cm = apply(base, f"lowrank_kv(keep={keep})")
        assert all(layer["k_norm"] for layer in cm.step_graph.notes["lowrank_kv"]["per_layer"].values())
        err[keep] = (cm.logits(ids, mask)[mask.bool()] - dense).abs().max().item()
    assert err[1.0] <= 1e-4, err
    assert err[0.25] > err[0.5] > err[0.75] > err[1.0], err
    assert torch.equal(apply(base, "lowrank_kv(keep=1.0)").generate(ids, attention_mask=mask, **GEN),
                       base.generate(ids, attention_mask=mask, **GEN))


def test_full_rank_lowrank_passes_compile_time_verification(tiny):
    cm = gw.compile(tiny(NAME), recipe="lowrank_kv(keep=1.0)")
    record = cm.verification["passes"][0]
    assert record["exact"] and record["max_abs_logit_diff"] <= 1e-4 and record["decode_max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("name", [n for n in registered() if examples(n).get("exact")])
def test_every_pass_applies_exactly_or_refuses_with_a_reason(compiled_tiny, name):
    ids, mask = left_padded_batch(256, LENGTHS, seed=2)
    base = compiled_tiny(NAME)
    try:
        cm = apply(base, examples(name)["exact"])
    except RecipeError as exc:
        assert "does not apply" in str(exc) or "needs" in str(exc) or "MoE" in str(exc), str(exc)
        return
    assert (cm.logits(ids, mask) - base.logits(ids, mask))[mask.bool()].abs().max() <= 1e-4
    assert torch.equal(cm.generate(ids, attention_mask=mask, **GEN), base.generate(ids, attention_mask=mask, **GEN))
