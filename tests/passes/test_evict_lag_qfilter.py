"""evict(score='lagkv' | 'qfilter'): kept sets on a model, Q-Filters calibration and files, compositions, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphwright import RecipeError
from graphwright.compiled import CompiledModel
from graphwright.passes.evict import Evict
from graphwright.passes.eviction_common import positions_name
from graphwright.passes.qfilter_calibrate import (
    KEY,
    calibrate_filters,
    calibration_ids,
    load_filters,
    save_filters,
)
from graphwright.verify import run_recipe
from tests.conftest import _compiled, _tiny, left_padded_batch
from tests.passes.eviction_helpers import decode_loop, run_pass, state_of

LENGTHS = [14, 9]


def kept_after_prefill(cm, ids, mask):
    seen = []

    def on_step(i, state):
        if i == 0:
            seen.extend([[sorted(int(p) for p in row if p >= 0) for row in heads]
                         for heads in state_of(cm, state, positions_name(layer))] for layer in range(cm.info.num_layers))

    _, toks, _ = decode_loop(cm, ids, mask, 3, on_step)
    return seen, toks


def test_lagkv_on_a_model_keeps_sinks_tail_and_the_budget():
    cm = run_pass(_compiled("tiny-llama"), Evict(score="lagkv", budget=8, lag=3, sinks=2))
    ids, mask = left_padded_batch(256, LENGTHS, seed=4)
    seen, _ = kept_after_prefill(cm, ids, mask)
    for layer in seen:
        for b, heads in enumerate(layer):
            for h in heads:
                assert len(h) == 8
                # row 0: 14 tokens = 2 sinks + 4 partitions of 3; the last (11-13) is always kept; row 1: 9 = 2 + 2*3 + 1
                assert {0, 1, 11, 12, 13} <= set(h) if b == 0 else {0, 1, 5, 6, 7, 8} <= set(h)


def _hf_filters(name, ids):
    """Filters from the HF module's own q_proj and rotary embedding, SVD by numpy (the module docstring's rule)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _tiny(name)
    cfg = model.config
    H, Hk = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    got = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o, at=li: got.__setitem__(at, o))
             for li, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
            T = ids.shape[1]
            cos, sin = model.model.rotary_emb(got[0], torch.arange(T)[None])
    finally:
        for h in hooks:
            h.remove()
    out = np.zeros((cfg.num_hidden_layers, Hk, D))
    g = H // Hk
    for li in range(cfg.num_hidden_layers):
        q = got[li].view(1, T, H, D).transpose(1, 2)
        q = apply_rotary_pos_emb(q, q, cos, sin)[0][0].double().numpy()  # [H, T, D]
        for hk in range(Hk):
            x = q[hk * g:(hk + 1) * g].reshape(-1, D)
            u = np.linalg.svd(x, full_matrices=False)[2][0]
            out[li, hk] = u if (x @ u).mean() < 0 else -u  # f = -u, u oriented so the mean query projection is > 0
    return torch.from_numpy(out).float()


def test_calibrated_filters_equal_an_svd_of_the_models_queries():
    sg = _compiled("tiny-llama").step_graph
    f = calibrate_filters(sg)
    want = _hf_filters("tiny-llama", calibration_ids(sg, None))
    assert f.shape == want.shape == (sg.info.num_layers, sg.info.num_kv_heads, sg.info.head_dim)
    assert torch.allclose(f, want, atol=1e-3), (f - want).abs().max()


def test_a_saved_file_gives_the_calibrated_sets(tmp_path):
    cm = _compiled("tiny-llama")
    path = tmp_path / "f.safetensors"
    save_filters(path, calibrate_filters(cm.step_graph))
    ids, mask = left_padded_batch(256, LENGTHS, seed=5)
    a = kept_after_prefill(run_pass(cm, Evict(score="qfilter", budget=6)), ids, mask)
    b = kept_after_prefill(run_pass(cm, Evict(score="qfilter", budget=6, filters=str(path))), ids, mask)
    flipped = tmp_path / "g.safetensors"
    save_filters(flipped, -calibrate_filters(cm.step_graph))
    c = kept_after_prefill(run_pass(cm, Evict(score="qfilter", budget=6, filters=str(flipped))), ids, mask)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert a[0] != c[0]  # the filters decide the sets
    assert all(len(h) == 6 for layer in a[0] for row in layer for h in row)


@pytest.mark.parametrize("kind", ["garbage", "key", "shape", "nan"])
def test_bad_filter_files_are_refused(tmp_path, kind):
    from safetensors.torch import save_file

    info = _compiled("tiny-llama").info
    L, Hk, D = info.num_layers, info.num_kv_heads, info.head_dim
    path = tmp_path / "bad.safetensors"
    if kind == "garbage":
        path.write_bytes(b"not a safetensors file")
        match = "is not a safetensors file"
    elif kind == "key":
        save_file({"other": torch.zeros(L, Hk, D)}, str(path))
        match = "holds \\['other'\\], not 'q_filters'"
    elif kind == "shape":
        save_file({KEY: torch.zeros(L + 1, Hk, D)}, str(path))
        match = f"has shape \\[{L + 1}, {Hk}, {D}\\]; this model needs \\[{L}, {Hk}, {D}\\]"
    else:
        save_file({KEY: torch.full((L, Hk, D), float("nan"))}, str(path))
        match = "must be finite"
    with pytest.raises(RecipeError, match=match):
        load_filters(path, info)
    with pytest.raises(RecipeError, match=match):
        run_pass(_compiled("tiny-llama"), Evict(score="qfilter", budget=6, filters=str(path)))


@pytest.mark.parametrize("args,msg", [
    (dict(score="knorm", budget=6, lag=4), "lag= is read only by score='lagkv'"),
    (dict(score="knorm", budget=6, filters="x.safetensors"), "filters= is read only by score='qfilter'"),
    (dict(score="lagkv", budget=6, when="decode"), "runs when='prefill' only"),
    (dict(score="lagkv", budget=6, when="every:4"), "runs when='prefill' only"),
    (dict(score="lagkv", budget=6, block=4), "runs when='prefill' only"),
    (dict(score="qfilter", budget=6, rule="adaptive"), "rule='adaptive' is not implemented"),
    (dict(score="lagkv", budget=6, chunk=2, chunk_reuse=2), "chunk_reuse is not implemented"),
    (dict(score="qfilter", budget=6, filters="/nonexistent/f.safetensors"), "no such file"),
    (dict(score="lagkv", budget=6, lag=0), "lag"),
])
def test_refusals(args, msg):
    with pytest.raises(RecipeError, match=msg):
        Evict(**args)


def test_qfilter_runs_every_n_steps():
    cm = _compiled("tiny-llama")
    ids, mask = left_padded_batch(256, [12, 12], seed=7)
    sizes = []
    ev = run_pass(cm, Evict(score="qfilter", budget=6, when="every:4"))
    decode_loop(ev, ids, mask, 9, lambda i, st: sizes.append(int((state_of(ev, st, positions_name(0))[0, 0] >= 0).sum())))
    assert sizes == [6, 7, 8, 9, 6, 7, 8, 9, 6, 7]


@pytest.mark.parametrize("recipe,op", [("evict(score='lagkv', budget=8, lag=3, sinks=2)", "graphwright::evict_scored_lag"),
                                       ("evict(score='qfilter', budget=6)", "graphwright::evict_scored_qfilter")])
def test_compiled_backend_runs_it_with_an_eager_fallback(recipe, op):
    sg, _, _ = run_recipe(_compiled("tiny-llama").step_graph, recipe, verify=False)
    cm, ref = CompiledModel(sg, recipe=recipe, backend="compiled"), CompiledModel(sg, recipe=recipe)
    cm._backend_step.compiler = lambda gm: gm
    ids, mask = left_padded_batch(256, LENGTHS, seed=8)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), want)
    assert [r["op"].name() for r in cm._backend_step.fallback["records"]] == [op] * 2
