"""The compiled backend (``codegen/torch/compiled.py``): torch.compile'd decode over static caches.

Invariant checked: decoding through static-capacity buffers (in-place slot writes, attention over
all ``C`` slots with -1 positions masking the empty ones) gives the torch backend's logits
(<= 1e-4) and greedy tokens, on a ragged left-padded batch, across a capacity bucket boundary
(one compile per bucket, none per step), and ``kv_bytes`` counts the buffers' capacity.
Inductor compiles C++ kernels: a compiled tiny model costs tens of seconds (100 s for the
tiny-llama case, under load, warm Inductor cache), so every Inductor case is ``slow``; by default
the same decode graph runs eagerly (``compiler = lambda gm: gm``), which checks the slot writes,
buckets and state adoption in about a second.
"""

from __future__ import annotations

import pytest
import torch

import graphwright as gw
from graphwright.capture.step_graph import positions_from_mask
from graphwright.codegen.torch import decode_linear
from graphwright.codegen.torch.compiled import capacity_for
from graphwright.codegen.torch.static_cache import slot_write
from graphwright.compiled import CompiledModel
from tests.conftest import left_padded_batch

PROMPT, NEW = 250, 12  # prompt + new tokens cross the 256-slot bucket: slots 250..261


def test_capacity_buckets_are_multiples_of_256_then_an_eighth_of_the_next_power_of_two():
    assert [capacity_for(n) for n in (1, 256, 257, 2048)] == [256, 256, 512, 2048]
    assert [capacity_for(n) for n in (2049, 4000, 4096, 4097)] == [2560, 4096, 4096, 5120]
    with pytest.raises(ValueError, match="a cache capacity is for >= 1 slots; got 0"):
        capacity_for(0)


@pytest.mark.parametrize("dim", [1, 2])
def test_slot_write_fills_the_slots_after_the_prefix_like_cat(dim):
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(2, 8, 8, 4, generator=g)
    before = buf.clone()
    new_shape = [2, 8, 8, 4]
    new_shape[dim] = 2
    new = torch.randn(new_shape, generator=g)
    out = slot_write(buf, new, dim, torch.tensor([3]))
    assert out is buf
    assert torch.equal(buf.narrow(dim, 0, 5), torch.cat([before.narrow(dim, 0, 3), new], dim))
    assert torch.equal(buf.narrow(dim, 5, buf.shape[dim] - 5), before.narrow(dim, 5, buf.shape[dim] - 5))


@torch.inference_mode()
def greedy_logits(cm, ids, mask, steps):
    """Greedy decode through the model's own step function; the logits of every step."""
    state = [s.empty(ids.shape[0]) for s in cm.step_graph.state]
    pos = positions_from_mask(mask)
    logits, state = cm._step(ids, pos, torch.tensor([ids.shape[1] - 1]), state)
    out, nxt_pos = [logits[:, -1]], pos[:, -1:] + 1
    for _ in range(steps):
        logits, state = cm._step(logits[:, -1].argmax(-1)[:, None], nxt_pos, torch.zeros(1, dtype=torch.long), state)
        out.append(logits[:, -1])
        nxt_pos = nxt_pos + 1
    return torch.stack(out, 1)


def frames_compiled() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


def check_against_torch(model, recipe=None, inductor=True):
    ref = gw.compile(model, recipe=recipe, backend="torch", verify=False)
    cm = CompiledModel(ref.step_graph, recipe=ref.recipe, backend="compiled")
    if not inductor:
        cm._backend_step.compiler = lambda gm: gm  # the static-cache decode graph, run eagerly
    compiles = 2 if inductor else 0
    ids, mask = left_padded_batch(ref.info.vocab_size, [PROMPT, PROMPT - 9], seed=1)
    frames = frames_compiled()
    got = greedy_logits(cm, ids, mask, NEW)
    assert frames_compiled() - frames == compiles  # one compile per bucket (256, 512), none per step
    want = greedy_logits(ref, ids, mask, NEW)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(out, ref.generate(ids, attention_mask=mask, max_new_tokens=NEW))
    stats = cm.last_stats
    assert stats["cache_capacity"] == 512 and [c["capacity"] for c in stats["compiles"]] == [256, 512]
    assert frames_compiled() - frames == compiles  # generate reused both compiled buckets
    return cm, stats


@pytest.mark.parametrize("inductor", [pytest.param(True, marks=pytest.mark.slow), False], ids=["inductor", "eager"])
def test_compiled_decode_equals_the_torch_backend_across_a_bucket(tiny, inductor, monkeypatch):
    calls = []
    real = decode_linear.decode_rows
    monkeypatch.setattr(decode_linear, "decode_rows", lambda x, w: calls.append(x.shape) or real(x, w))
    cm, stats = check_against_torch(tiny("tiny-llama"), inductor=inductor)
    # every decode GEMV (batch 2: 2 rows) reaches decode_rows, through the graphwright::decode_gemv op under Inductor:
    # 7 linears per layer and the LM head in each decode step of both models, greedy (NEW steps) and generate (NEW - 1),
    # and the LM head on the last prompt position of each of the 4 prefills; without the op the compiled model's
    # calls would be missing
    linears = 7 * cm.info.num_layers + 1
    assert len(calls) == 2 * (2 * NEW - 1) * linears + 4 and all(s[:-1].numel() == 2 for s in calls)
    # kv_bytes: the static buffers' capacity (512 slots), not the filled length
    assert stats["kv_bytes"] == cm.info.dense_kv_bytes_per_token() * 2 * 512
    assert stats["kept_tokens_per_head"][0] == [[PROMPT + NEW - 1] * cm.info.num_kv_heads, [PROMPT - 9 + NEW - 1] * cm.info.num_kv_heads]


@pytest.mark.slow
@pytest.mark.parametrize("name, recipe", [("tiny-qwen2", None), ("tiny-llama", "window(size=64)"), ("tiny-llama", "lowrank_kv(keep=0.5)")])
def test_compiled_decode_equals_the_torch_backend_other_models_and_recipes(tiny, name, recipe):
    check_against_torch(tiny(name), recipe)


def test_graphs_whose_state_is_not_appended_or_static_slots_are_refused_naming_what_is_supported(tiny):
    with pytest.raises(ValueError, match=r"backend='compiled' cannot run this graph: state input .* is not only appended to"
                                         r".*It supports recipes whose KV state grows only by appending \(identity, window, lowrank_kv"
                                         r".*and eviction with a fixed decode capacity: streaming\(sinks, window\), h2o\(heavy=N, recent=M\)"):
        gw.compile(tiny("tiny-llama"), recipe="block_sparse(block=4, top_k=2, dense_layers=[])", backend="compiled", verify=False)


def test_the_cli_accepts_backend_compiled():
    from graphwright.cli.main import build_parser

    assert build_parser().parse_args(["generate", "--model", "tiny-llama", "--backend", "compiled", "hi"]).backend == "compiled"
