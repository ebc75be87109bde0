"""block_sparse: exact with top_k >= blocks; op == naive per-query oracle; gather kernel == reference; Quest bound."""

from __future__ import annotations

import math

import pytest
import torch

from graphwright.codegen.torch.block_sparse import block_sparse_sdpa
from graphwright.compiled import CompiledModel
from graphwright.errors import RecipeError
from graphwright.ops.block_sparse import BLOCK_SPARSE_ATTENTION, block_sparse_attention, page_stats, quest_upper_bound
from graphwright.verify import run_recipe
from tests.conftest import left_padded_batch

LENGTHS = [30, 21]


def apply(cm, recipe, backend="torch") -> CompiledModel:
    """``recipe`` run on a copy of cm's captured graph (no re-capture: tiny tests stay fast)."""
    sg, _, _ = run_recipe(cm.step_graph, recipe, verify=False)
    return CompiledModel(sg, backend=backend)


def _run(cm, ids, mask, n=10):
    return cm.logits(ids, mask), cm.generate(ids, max_new_tokens=n, attention_mask=mask, eos_token_id=[])


@pytest.mark.parametrize("recipe", [
    "block_sparse(block=4, top_k=10, dense_layers=[])",  # 30 + 10 tokens -> 10 blocks
    "block_sparse(block=8, top_k=5, mode='moba', prefill=true, dense_layers=[0])",
])
def test_top_k_covering_every_block_is_identity(compiled_tiny, recipe):
    base = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    want_logits, want = _run(base, ids, mask)
    cm = apply(base, recipe)
    got_logits, got = _run(cm, ids, mask)
    assert torch.equal(got, want)
    assert (got_logits - want_logits)[mask.bool()].abs().max() <= 1e-4
    assert sum(n.target is BLOCK_SPARSE_ATTENTION for n in cm.graph.graph.nodes) == cm.step_graph.notes["block_sparse"]["counts"]["layers_sparse"]


def test_small_top_k_changes_decode_only_for_quest(compiled_tiny):
    """Quest keeps prefill dense: prompt logits equal dense; decode tokens are computed from fewer keys."""
    base = compiled_tiny("tiny-llama")
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    cm = apply(base, "block_sparse(block=4, top_k=2, dense_layers=[])")
    assert torch.equal(cm.logits(ids, mask), base.logits(ids, mask))
    ref = apply(base, "block_sparse(block=4, top_k=2, dense_layers=[])", backend="reference")
    out = cm.generate(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out, ref.generate(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=[]))


def _oracle(q, k, v, q_pos, k_pos, scale, block, top_k, mode):
    """Naive loops: per (row, KV head, query) score each candidate block, keep top_k, softmax over them."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    out = torch.zeros(B, H, T, v.shape[-1])
    for b in range(B):
        blocks = {}
        for s in range(S):
            if k_pos[b, s] >= 0:
                blocks.setdefault(int(k_pos[b, s]) // block, []).append(s)
        for hk in range(Hk):
            for t in range(T):
                qp = int(q_pos[b, t])
                if qp < 0:
                    continue
                scores = {}
                for c, cols in blocks.items():
                    if c * block > qp:
                        continue
                    kb = k[b, hk, cols]
                    per_head = []
                    for h in range(hk * g, (hk + 1) * g):
                        if mode == "quest":
                            m, M = kb.min(0).values, kb.max(0).values
                            per_head.append(float(torch.maximum(q[b, h, t] * m, q[b, h, t] * M).sum()))
                        else:
                            per_head.append(float(q[b, h, t] @ kb.mean(0)))
                    scores[c] = sum(per_head) / g
                    if mode == "moba" and c == qp // block:
                        scores[c] = math.inf
                kept = sorted(scores, key=lambda c: -scores[c])[:top_k]
                cols = [s for c in kept for s in blocks[c] if k_pos[b, s] <= qp]
                for h in range(hk * g, (hk + 1) * g):
                    w = torch.softmax(torch.stack([q[b, h, t] @ k[b, hk, s] for s in cols]) * scale, 0)
                    out[b, h, t] = sum(wi * v[b, hk, s] for wi, s in zip(w, cols))
    return out


def _inputs(T, S=37, seed=0, pad=(0, 5)):
    g = torch.Generator().manual_seed(seed)
    B, H, Hk, D = 2, 4, 2, 8
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    k_pos = torch.full((B, S), -1, dtype=torch.long)
    for b in range(B):
        k_pos[b, pad[b]:] = torch.arange(S - pad[b])
    return q, k, v, k_pos[:, S - T:], k_pos


@pytest.mark.parametrize("mode, T, prefill", [("quest", 1, False), ("moba", 1, False), ("moba", 9, True)])
def test_op_equals_naive_oracle(mode, T, prefill):
    q, k, v, q_pos, k_pos = _inputs(T)
    got = block_sparse_attention(q, k, v, q_pos, k_pos, 0.3, 4, 3, mode, prefill)
    want = _oracle(q, k, v, q_pos, k_pos, 0.3, 4, 3, mode)
    assert (got - want).abs().max() < 1e-5
    dense = block_sparse_attention(q, k, v, q_pos, k_pos, 0.3, 4, 100, mode, prefill)
    assert (got - dense).abs().max() > 1e-3  # the selection really drops blocks


@pytest.mark.parametrize("mode", ["quest", "moba"])
@pytest.mark.parametrize("pad", [(0, 0), (0, 5)])
def test_torch_gather_kernel_equals_reference(mode, pad):
    q, k, v, q_pos, k_pos = _inputs(1, S=70, seed=3, pad=pad)
    for top_k in (1, 3, 5):
        got = block_sparse_sdpa(q, k, v, q_pos, k_pos, 0.3, 8, top_k, mode)
        want = block_sparse_attention(q, k, v, q_pos, k_pos, 0.3, 8, top_k, mode)
        assert (got - want).abs().max() < 1e-5


def test_quest_bound_is_an_upper_bound_of_every_page():
    q, k, _, _, k_pos = _inputs(3, S=53, seed=5)
    nb = 53 // 8 + 1
    U = quest_upper_bound(q, page_stats(k, k_pos, 8, nb, "min"), page_stats(k, k_pos, 8, nb, "max"))  # [B, Hk, g, T, NB]
    B, H, T, D = q.shape
    g = H // k.shape[1]
    for b in range(B):
        for c in range(nb):
            cols = [s for s in range(k.shape[2]) if k_pos[b, s] >= 0 and k_pos[b, s] // 8 == c]
            if not cols:
                continue
            for h in range(H):
                true_max = (k[b, h // g, cols] @ q[b, h].T).max(0).values  # [T]
                assert (U[b, h // g, h % g, :, c] >= true_max - 1e-5).all()
                assert (U[b, h // g, h % g, :, c] - true_max).min() < 10  # a bound, not infinity


@pytest.mark.parametrize("recipe, match", [
    ("block_sparse(prefill=true)", "moba"),
    ("block_sparse(dense_layers=[7])", "out of range"),
    ("block_sparse(dense_layers=[0, 1])", "leaves no layer"),
    ("block_sparse(mode='dense')", "one of"),
    ("block_sparse(top_k=0)", "out of range"),
])
def test_bad_arguments_raise_recipe_error(compiled_tiny, recipe, match):
    with pytest.raises(RecipeError, match=match):
        apply(compiled_tiny("tiny-llama"), recipe)


@pytest.mark.slow
def test_exact_settings_on_smollm2():
    """SmolLM2-135M, a ~160-token prompt: top_k >= blocks, window >= length, keep >= length give the dense tokens."""
    import graphwright as gw
    from graphwright.eval.niah import encode, needle_grid

    model, tok = gw.load_model("smollm2-135m")
    base = gw.compile(model, tokenizer=tok, verify=False)
    case = needle_grid(tok, lengths=(160,), depths=(0.5,))[0]
    ids = torch.tensor([encode(tok, case["prompt"]).input_ids])
    want = base.generate(ids, max_new_tokens=4, eos_token_id=[])
    for recipe in ("block_sparse(block=32, top_k=6, mode='quest')", "block_sparse(block=32, top_k=6, mode='moba', prefill=true)",
                   "window(size=170, sinks=4)", "gemfilter(keep=170)"):
        assert torch.equal(apply(base, recipe).generate(ids, max_new_tokens=4, eos_token_id=[]), want), recipe
    # the rewrite covers every layer but the two dense ones (Quest keeps layers 0-1 dense)
    sparse = apply(base, "block_sparse(block=32, top_k=2, mode='quest')")
    assert sum(n.target is BLOCK_SPARSE_ATTENTION for n in sparse.graph.graph.nodes) == 28


@pytest.mark.parametrize("pads", [[0, 4], [0, 0]], ids=["left-padded", "aligned"])
@pytest.mark.parametrize("stat", ["min", "max", "mean"])
def test_page_summary_update_equals_recompute(stat, pads):
    """The incremental page update (one page per decode step) equals recomputing every page, with
    and without left padding (the no-padding fast path), pages straddling prefill and decode."""
    from graphwright.ops.page_summary import page_summary_incremental, page_summary_reference

    g = torch.Generator().manual_seed(3)
    B, Hk, D, block = 2, 3, 8, 5
    pad = torch.tensor(pads)
    T0 = 13
    k = torch.randn(B, Hk, T0, D, generator=g)
    k_pos = (torch.arange(T0)[None] - pad[:, None]).clamp(min=-1)
    prev = torch.zeros(B, Hk, 0, D)
    q_pos = k_pos
    for _step in range(12):
        got = page_summary_incremental(k, k_pos, q_pos, prev, block, stat)
        want = page_summary_reference(k, k_pos, q_pos, prev, block, stat)
        assert got.shape == (B, Hk, -(-k.shape[2] // block), D)
        if stat == "mean":
            assert torch.allclose(got, want, atol=1e-6)
        else:
            assert torch.equal(got, want)
        prev = got
        q_pos = k_pos[:, -1:] + 1
        k = torch.cat([k, torch.randn(B, Hk, 1, D, generator=g)], 2)
        k_pos = torch.cat([k_pos, q_pos], 1)


@pytest.mark.parametrize("mode", ["quest", "moba"])
def test_page_state_gives_the_same_attention(mode):
    """Passing the page statistics (as the pass does) equals recomputing them inside the op."""
    g = torch.Generator().manual_seed(4)
    B, H, Hk, S, D, block = 2, 4, 2, 37, 8, 4
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    k_pos = (torch.arange(S)[None] - torch.tensor([[0], [6]])).clamp(min=-1)
    q_pos = k_pos[:, -1:]
    stats = [page_stats(k, k_pos, block, -(-S // block), s) for s in (("min", "max") if mode == "quest" else ("mean",))]
    stats += [None] * (2 - len(stats))
    want = block_sparse_attention(q, k, v, q_pos, k_pos, 0.3, block, 3, mode)
    assert torch.equal(block_sparse_attention(q, k, v, q_pos, k_pos, 0.3, block, 3, mode, False, *stats), want)
    assert torch.allclose(block_sparse_sdpa(q, k, v, q_pos, k_pos, 0.3, block, 3, mode, False, *stats), want, atol=1e-5)
    with pytest.raises(ValueError, match="page statistics"):
        block_sparse_attention(q, k, v, q_pos, k_pos, 0.3, block, 3, mode, False, stats[0][:, :, :2], stats[1])


def test_pass_keeps_page_state(compiled_tiny):
    """Quest layers carry page_min / page_max state ([B, Hk, pages, D] fp32); dense layers none."""
    base = compiled_tiny("tiny-llama")
    cm = apply(base, "block_sparse(block=4, top_k=2, dense_layers=[0])")
    names = [s.name for s in cm.step_graph.state if s.kind == "summary"]
    sparse = cm.step_graph.notes["block_sparse"]["counts"]["layers_sparse"]
    assert len(names) == 2 * sparse and "page_min0" not in names and {"page_min1", "page_max1"} <= set(names)
    ids, mask = left_padded_batch(256, LENGTHS, seed=1)
    cm.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    info = cm.info
    S = ids.shape[1] + 5  # the last token is sampled, not fed back
    assert cm.last_stats["kv_summary_bytes"] == 2 * sparse * 2 * info.num_kv_heads * -(-S // 4) * info.head_dim * 4


@pytest.mark.parametrize("mode", ["quest", "moba"])
@pytest.mark.parametrize("S", [64, 70], ids=["whole-blocks", "partial-last-block"])
def test_gather_kernel_without_padding_equals_reference(mode, S):
    """The no-padding decode fast path (blocks are column slices) equals the reference."""
    g = torch.Generator().manual_seed(S)
    B, H, Hk, D, block = 2, 6, 3, 8, 8
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    k_pos = torch.arange(S)[None].expand(B, S)
    q_pos = k_pos[:, -1:]
    want = block_sparse_attention(q, k, v, q_pos, k_pos, 0.4, block, 3, mode)
    assert torch.allclose(block_sparse_sdpa(q, k, v, q_pos, k_pos, 0.4, block, 3, mode), want, atol=1e-5)
