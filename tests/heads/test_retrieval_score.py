import pytest
import torch

import graphwright as gw
from graphwright.heads.retrieval_score import ATTN_NAME, _Recorder, copy_hits, copy_hits_reference, pool_kv, rouge1_recall, route_attention


def test_copy_hits_equals_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 5, (40,), generator=g)  # few distinct ids: many same-token hits outside the span
    for trial in range(20):
        argmax = torch.randint(0, 40, (3, 4), generator=g)
        s = int(torch.randint(0, 30, (1,), generator=g))
        span, token = (s, s + 7), int(prompt[s + trial % 7])
        fast, ref = copy_hits(argmax, prompt, span, token), copy_hits_reference(argmax, prompt, span, token)
        assert torch.equal(fast, ref)
    assert ref.dtype == torch.float64


def test_synthetic_copy_head_scores_one_and_the_others_zero():
    """Head (0, 0) attends to the needle token being emitted; the others to a haystack token or a
    needle token that is not the one being emitted: only (0, 0) collects the full 1/len(span) per step."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 200, (64,), generator=g)
    s, e = 20, 28
    prompt[s:e] = torch.arange(300, 308)  # distinct needle ids
    total = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(e - s):
        token = int(prompt[s + t])
        argmax = torch.randint(30, 64, (2, 4), generator=g)  # outside the span
        argmax[0, 0] = s + t
        argmax[1, 1] = s + (t + 1) % (e - s)  # inside the span, wrong token
        total += copy_hits(argmax, prompt, (s, e), token)
    assert total[0, 0].item() == pytest.approx(1.0)
    assert total.sum().item() == pytest.approx(1.0)
    assert pool_kv(total.float(), 2, "max").tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert pool_kv(total.float(), 2, "mean").tolist() == [[0.5, 0.0], [0.0, 0.0]]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"copy span \[5, 5\) must be non-empty"):
        copy_hits(torch.zeros(1, 1, dtype=torch.long), torch.zeros(10, dtype=torch.long), (5, 5), 0)
    with pytest.raises(ValueError, match="pool must be one of"):
        pool_kv(torch.zeros(2, 4), 2, "sum")
    with pytest.raises(ValueError, match="4 query heads do not split into 3"):
        pool_kv(torch.zeros(2, 4), 3)


def test_rouge1_recall_counts_gold_words():
    assert rouge1_recall(" read poems to the sleeping cats.", "read poems to the sleeping cats") == 1.0
    assert rouge1_recall("to dance", "read poems to the sleeping cats") == pytest.approx(1 / 6)
    assert rouge1_recall("the the", "the cat the") == pytest.approx(2 / 3)


def test_recorded_argmax_is_the_eager_attention_argmax_and_outputs_are_unchanged():
    """The hook's last-row argmax equals the argmax of HF eager attention probabilities, per layer and head."""
    model = gw.load_model("tiny-llama")[0]
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, output_attentions=True)
    model.set_attn_implementation("sdpa")
    rec = _Recorder()
    with torch.no_grad(), route_attention(model, ATTN_NAME, rec):
        out = model(input_ids=ids)
    got = rec.take(2)
    want = torch.stack([a[0, :, -1].argmax(-1) for a in ref.attentions])
    assert torch.equal(got, want)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
