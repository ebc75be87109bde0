"""Per-step tensors shared by a decode step's layers (``codegen/torch/step_memo.py``), the RoPE inversion
with memoised angles and the all-visible check of slot decode attention."""

from __future__ import annotations

import torch

from graphwright.capture.ops import visible_mask
from graphwright.codegen.torch.attention import _all_visible
from graphwright.codegen.torch.eviction_slots import rope_invert_fast
from graphwright.codegen.torch.step_memo import memo, slot_memo, step_info
from graphwright.ops.eviction_ref import row_length
from graphwright.ops.rope_index_ref import rope_invert_reference


def test_step_info_values_equal_the_expressions_they_replace():
    q_pos = torch.tensor([[17], [-1], [4]])
    info = step_info(q_pos)
    assert torch.equal(info.length, row_length(q_pos))
    assert info.real.view(-1).tolist() == [True, False, True]
    assert info.q_lift.view(-1).tolist() == [17, torch.iinfo(torch.long).max, 4]
    k_pos = torch.tensor([[[3, -1, 17]], [[0, 1, 2]], [[4, -1, -1]]])
    # the slot-probability mask built from q_lift equals the reference visibility
    assert torch.equal((k_pos >= 0) & (k_pos <= info.q_lift), visible_mask(q_pos, k_pos)[:, :, 0, 0])


def test_step_info_is_built_once_per_positions_tensor():
    q_pos = torch.tensor([[5]])
    a = step_info(q_pos)
    assert step_info(q_pos) is a
    calls = []
    assert memo(a, "x", lambda: calls.append(1) or torch.ones(1)) is memo(a, "x", lambda: calls.append(1) or torch.ones(1))
    assert calls == [1]
    assert step_info(q_pos.clone()) is not a  # equal values, another step: rebuilt


def test_rope_invert_fast_is_the_reference_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    pos = torch.tensor([[9], [-1]])
    for H, scaling in ((4, 1.0), (2, 1.0), (4, 0.7)):  # query and key heads share the step's angles
        x = torch.randn(2, H, 1, 12, generator=g)  # 8 rotary dims + 4 passed through
        assert torch.equal(rope_invert_fast(x, pos, inv_freq, scaling), rope_invert_reference(x, pos, inv_freq, scaling))
    prompt = torch.arange(6)[None]
    x = torch.randn(1, 2, 6, 8, generator=g)
    assert torch.equal(rope_invert_fast(x, prompt, inv_freq, 1.0), rope_invert_reference(x, prompt, inv_freq, 1.0))


def test_all_visible_only_when_the_mask_is_all_true():
    q_pos = torch.tensor([[10], [12]])
    full = torch.tensor([[[1, 4, 10]], [[0, 11, 12]]])
    assert _all_visible(q_pos, full) and bool(visible_mask(q_pos, full).all())
    for k_pos in (torch.tensor([[[1, -1, 10]], [[0, 11, 12]]]),  # an empty slot
                  torch.tensor([[[1, 4, 11]], [[0, 11, 12]]])):  # a key after its row's query
        assert not _all_visible(q_pos, k_pos) and not bool(visible_mask(q_pos, k_pos).all())
    pad = torch.tensor([[-1], [12]])  # a padding row sees every valid slot
    assert _all_visible(pad, full) and bool(visible_mask(pad, full).all())


def test_slot_memo_is_shared_only_by_equal_positions_and_keeps_a_copy():
    info = step_info(torch.tensor([[7]]))
    a = torch.tensor([[[0, 1, 6, 7]]])
    first = slot_memo(info, "k", a)
    first["j"] = "made once"
    assert slot_memo(info, "k", a.clone()) is first  # another layer, equal positions: shared
    a[0, 0, 2] = -1  # the first layer's eviction writes its k_pos in place: the memo's copy is unchanged
    assert torch.equal(first["k_pos"], torch.tensor([[[0, 1, 6, 7]]]))
    other = slot_memo(info, "k", torch.tensor([[[0, 2, 6, 7]]]))  # different positions: a fresh dict
    assert other is not first and "j" not in other
    assert slot_memo(info, "k2", torch.tensor([[[0, 2, 6, 7]]])) is not other  # keys apart


def test_memos_made_under_inference_mode_serve_a_later_step_with_autograd(compiled_tiny):
    """generate() runs under inference_mode; a later step with autograd on (a user's own loop, a gradient probe)
    must not get cached rows or constants that are inference tensors (they cannot be saved for backward).
    StreamingLLM's prompt step reads the rank memo and the rope table; H2O's decode reads the slot constants; an
    unpadded H2O prompt reads the causal tile (``prefill_scores._TILES``) and the head index (``eviction_slots._HEADS``)."""
    from graphwright import CompiledModel
    from graphwright.codegen.torch import eviction_slots, prefill_scores
    from graphwright.capture.step_graph import positions_from_mask
    from graphwright.passes.pipeline import run_recipe
    from tests.conftest import left_padded_batch

    base = compiled_tiny("tiny-llama")
    for recipe, lengths in [("streaming(sinks=2, window=6)", [12, 7]), ("h2o(heavy=4, recent=4)", [12, 7]),
                            ("h2o(heavy=4, recent=4)", [12, 12])]:
        prefill_scores._TILES.clear()  # made afresh below, under inference_mode
        eviction_slots._HEADS.clear()
        cm = CompiledModel(run_recipe(base.step_graph, recipe)[0])
        ids, mask = left_padded_batch(256, lengths, seed=4)
        pos, li = positions_from_mask(mask), torch.arange(ids.shape[1])
        with torch.inference_mode():
            want, _ = cm._step(ids, pos, li, cm.runtime_graph.init_state(2))
            cm.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
        got, state = cm._step(ids, pos, li, cm.runtime_graph.init_state(2))  # autograd on: no inference tensor saved
        assert not torch.is_inference(got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        nxt = torch.full((2, 1), 5)
        step_pos = pos[:, -1:] + 1
        out, _ = cm._step(nxt, step_pos, torch.arange(1), list(state))
        assert out.shape[0] == 2 and torch.isfinite(out).all()
