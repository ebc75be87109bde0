"""Decode-step attention on the torch backend (one query per row): the per-step mask memo and the
mask-free call when every key is visible equal the reference (codegen/torch/attention.py)."""

from __future__ import annotations

import pytest
import torch

from graphwright.capture.ops import attention_reference
from graphwright.codegen.torch import attention as att


def _qkv(B=2, H=6, Hk=2, S=9, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g))


def _close(q, k, v, q_pos, k_pos, fn=att.attention_sdpa, **kw):
    got = fn(q, k, v, q_pos, k_pos, 0.3, **kw)
    want = attention_reference(q, k, v, q_pos, k_pos, 0.3, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return att._LAST_MASK.entry[4]


def test_all_visible_runs_without_a_mask_and_equals_the_reference():
    q, k, v = _qkv()
    k_pos = torch.arange(9).expand(2, 9)
    assert _close(q, k, v, torch.full((2, 1), 8), k_pos) is None  # no mask kept: SDPA ran without one
    bias = torch.randn(2, 6, 9)
    _close(q, k, v, torch.full((2, 1), 8), k_pos, key_bias=bias)  # a key bias still applies


def test_left_padded_batch_and_empty_slots_keep_their_mask():
    q, k, v = _qkv()
    k_pos = torch.tensor([[-1, -1, -1, 0, 1, 2, 3, 4, 5], list(range(9))])  # row 0 left-padded
    assert _close(q, k, v, torch.tensor([[5], [8]]), k_pos) is not None
    slots = torch.tensor([[[3, -1, 0, 1, 2, -1, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8]],
                          [[-1, 7, 2, 8, 0, 1, -1, 3, 4], [8, 7, 6, 5, 4, 3, 2, 1, 0]]])  # per-head slots, any order
    _close(q, k, v, torch.tensor([[8], [8]]), slots)
    _close(q, k, v, torch.tensor([[8], [8]]), slots, key_bias=torch.randn(2, 6, 9))  # steering's key bias on slots
    for fn in (att.attention_sdpa, att.attention_sdpa_scored):  # explicit probabilities (H2O/FastGen layers) or SDPA
        _close(q, k, v, torch.tensor([[8], [8]]), slots, fn=fn)
        _close(q, k, v, torch.tensor([[8], [8]]), slots, fn=fn, key_bias=torch.randn(2, 6, 9))


def test_full_per_head_slots_run_sdpa_without_a_mask_and_keep_no_probabilities():
    """StreamingLLM/SnapKV decode: per-head slots, all valid and visible -> SDPA without a mask, nothing kept."""
    from graphwright.codegen.torch import decode_probs as dp

    q, k, v = _qkv()
    slots = torch.tensor([[[3, 7, 0, 1, 2, 6, 4, 5, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8]],
                          [[5, 7, 2, 8, 0, 1, 6, 3, 4], [8, 7, 6, 5, 4, 3, 2, 1, 0]]])
    dp._LAST.entry = ()
    assert _close(q, k, v, torch.tensor([[8], [8]]), slots) is None
    assert dp._LAST.entry == ()


@pytest.mark.parametrize("window, sinks", [(3, 0), (3, 2), (20, 1)])
def test_windows_equal_the_reference(window, sinks):
    q, k, v = _qkv(S=9)
    _close(q, k, v, torch.full((2, 1), 8), torch.arange(9).expand(2, 9), window=window, sinks=sinks)


def test_the_memo_is_reused_for_the_same_tensors_only():
    q, k, v = _qkv()
    q_pos, k_pos = torch.full((2, 1), 8), torch.arange(9).expand(2, 9)
    _close(q, k, v, q_pos, k_pos)
    kept = att._LAST_MASK.entry
    _close(q, k, v, q_pos, k_pos)  # the next layer of the same step
    assert all(a is b for a, b in zip(att._LAST_MASK.entry, kept))
    padded = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5, 6], list(range(9))])  # new tensors: a new mask
    assert _close(q, k, v, torch.tensor([[6], [8]]), padded) is not None


def test_slot_attention_keeps_its_probabilities_for_the_running_score_only_on_the_same_tensors():
    from graphwright.codegen.torch import decode_probs as dp

    q, k, v = _qkv()
    q_pos = torch.tensor([[8], [6]])
    slots = torch.tensor([[[3, -1, 0, 1, 2, -1, 4, 5, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8]],
                          [[-1, -1, 2, 6, 0, 1, -1, 3, 4], [-1, -1, 6, 5, 4, 3, 2, 1, 0]]])  # row 1 left-padded
    _close(q, k, v, q_pos, slots, fn=att.attention_sdpa_scored)
    kept = dp._LAST.entry[6]
    assert dp.step_probs(q, k, q_pos, slots, 0.3) is kept and not dp._LAST.entry  # taken once
    assert torch.equal(kept, dp.slot_probs(q, k, q_pos, slots, 0.3))
    other = slots.clone()
    _close(q, k, v, q_pos, slots, fn=att.attention_sdpa_scored)
    assert dp.step_probs(q, k, q_pos, other, 0.3) is not dp._LAST.entry[6]  # other tensors: computed afresh


def test_kept_masks_and_probabilities_are_per_thread():
    """Concurrent generations on one model: a decode step's reused mask and kept probabilities
    belong to the thread that made them, never to another thread's step."""
    import threading

    from graphwright.codegen.torch import attention as att
    from graphwright.codegen.torch import decode_probs as dp

    q, k, v = _qkv()
    q_pos = torch.tensor([[8], [6]])
    slots = torch.tensor([[[3, -1, 0, 1, 2, -1, 4, 5, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8]],
                          [[-1, -1, 2, 6, 0, 1, -1, 3, 4], [-1, -1, 6, 5, 4, 3, 2, 1, 0]]])
    _close(q, k, v, q_pos, slots, fn=att.attention_sdpa_scored)
    seen = []
    t = threading.Thread(target=lambda: seen.append((dp._LAST.entry, att._LAST_MASK.entry)))
    t.start()
    t.join()
    assert seen == [((), ())] and dp._LAST.entry[3] is slots


def test_scored_attention_with_full_at_skips_the_mask_only_on_full_steps():
    """attention_sdpa_scored(full_at=c): with c + 1 valid slots and every row at least c + 1 long it builds
    no mask (same output and probabilities as the masked path); on any other step it keeps the mask."""
    from graphwright.codegen.torch import decode_probs

    q, k, v = _qkv(S=6)
    slots = torch.tensor([[[3, 9, 0, 1, 2, 10], [10, 4, 5, 6, 7, 8]], [[20, 7, 2, 8, 0, 21], [21, 1, 3, 4, 5, 6]]])
    q_pos = torch.tensor([[10], [21]])
    got = att.attention_sdpa_scored(q, k, v, q_pos, slots, 0.3, full_at=5)
    p_full = decode_probs._LAST.entry[6]
    torch.testing.assert_close(got, attention_reference(q, k, v, q_pos, slots, 0.3), atol=1e-5, rtol=1e-5)
    assert torch.equal(p_full, decode_probs.slot_probs(q, k, q_pos, slots, 0.3))  # the mask would keep every score
    # a row shorter than c + 1 (a padding query: q_pos -1): the masked path, with that row's empty slot
    holes = slots.clone()
    holes[1, :, 0] = -1
    short = torch.tensor([[10], [-1]])
    got = att.attention_sdpa_scored(q, k, v, short, holes, 0.3, full_at=5)
    torch.testing.assert_close(got, attention_reference(q, k, v, short, holes, 0.3), atol=1e-5, rtol=1e-5)
    assert (decode_probs._LAST.entry[6][1, :, :, 0] == 0).all()  # the empty slot got no probability


@pytest.mark.parametrize("H,Hk", [(6, 2), (6, 6), (9, 3)])
def test_grouped_decode_equals_sdpa_with_expanded_heads(H, Hk):
    """The g query heads of a KV head as g query rows (no K/V expansion) = SDPA over K/V repeated per query head
    (query head h reads KV head h // g), with and without a per-KV-head mask."""
    q, k, v = _qkv(H=H, Hk=Hk, S=11)
    g = H // Hk
    ke, ve = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(q, ke, ve, scale=0.3)
    torch.testing.assert_close(att._grouped_decode(q, k, v, 0.3), want, atol=1e-6, rtol=1e-5)
    mask = torch.rand(2, Hk, 1, 11, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(q, ke, ve, attn_mask=mask.repeat_interleave(g, dim=1), scale=0.3)
    torch.testing.assert_close(att._grouped_decode(q, k, v, 0.3, mask), want, atol=1e-6, rtol=1e-5)
