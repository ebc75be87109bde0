"""evict(block=N) in ONNX Runtime: the export records ``prefill_chunk`` and ``graphwright.load`` runs the
prompt in the same blocks of N as the torch runtime (``Runtime(prefill_chunk=N)``), so every block evicts
back to budget in ORT too. Compared with the torch backend on a left-padded batch of 2: kept position sets
per (row, layer, KV head) after the prompt and after each of 30 teacher-forced decode steps, logits at
every real prompt position and every decode step (<= 1e-4), and greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

import graphwright as gw
from graphwright.capture.step_graph import positions_from_mask
from tests.conftest import left_padded_batch

PREFILL, STEPS = 29, 30  # 29 = 7 * 4 + 1: the first block is one token on an empty cache


def kept_sets(state, specs):
    """{state name: [[sorted positions] per KV head] per row} for every per-head positions state."""
    return {s.name: [[sorted(int(p) for p in head if p >= 0) for head in row] for row in t]
            for t, s in zip(state, specs) if s.kind == "positions" and s.layer is not None}


@torch.inference_mode()
def stream(model, ids, mask):
    """The runtime's own prompt step (in blocks when it has a prefill_chunk), logits at every prompt
    position, then one teacher-forced decode step per later token -> (logits [B, T, V], kept sets per step)."""
    rt = model._runtime
    B, T = ids.shape
    pos = positions_from_mask(mask)
    state = [s.empty(B, ids.device) for s in rt.specs]
    logits, state = rt._prompt(ids[:, :PREFILL], pos[:, :PREFILL], torch.arange(PREFILL), state, {})
    out, seen = [logits], [kept_sets(state, rt.specs)]
    for t in range(PREFILL, T):
        logits, state = rt.step(ids[:, t:t + 1], pos[:, t:t + 1], torch.zeros(1, dtype=torch.long), state)
        out.append(logits[:, -1:])
        seen.append(kept_sets(state, rt.specs))
    return torch.cat(out, dim=1), seen


@pytest.mark.parametrize("recipe", ["evict(score='keydiff', block=4, budget=8, window=1)",
                                    "evict(score='h2o', block=4, budget=8, window=2)"])
def test_onnx_runtime_runs_the_prompt_in_blocks_like_torch(onnx_artifact, recipe):
    cm, out = onnx_artifact("tiny-llama", recipe)
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["prefill_chunk"] == 4 and meta["verification"]["passed"]
    rt = gw.load(out)
    assert rt._runtime.prefill_chunk == 4
    ids, mask = left_padded_batch(256, (PREFILL + STEPS, PREFILL + STEPS - 8), seed=11)
    want, want_sets = stream(cm, ids, mask)
    got, got_sets = stream(rt, ids, mask)
    assert got_sets == want_sets
    assert all(len(h) <= 8 for layer in got_sets[0].values() for row in layer for h in row)  # each block evicted
    real = mask.bool()
    assert (got - want)[real].abs().max().item() <= 1e-4
    # one-shot scoring of the whole prompt keeps other sets: ORT ignoring the blocks would fail the equality above
    one_shot = gw.compile(cm.source, recipe=recipe.replace("block=4", "when='prefill'"), verify=False)
    assert stream(one_shot, ids, mask)[1][0] != want_sets[0]
    gen = dict(max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    tokens = cm.generate(ids[:, :PREFILL], attention_mask=mask[:, :PREFILL], **gen)
    assert torch.equal(rt.generate(ids[:, :PREFILL], attention_mask=mask[:, :PREFILL], **gen), tokens)
    assert rt.last_stats["kept_tokens_per_head"] == cm.last_stats["kept_tokens_per_head"]


@pytest.mark.parametrize("bad", [1, 0, "4", 2.5])
def test_a_bad_prefill_chunk_in_the_metadata_is_refused(onnx_artifact, bad):
    from graphwright.codegen.onnx.metadata_schema import validate
    from graphwright.errors import GraphwrightError

    _, out = onnx_artifact("tiny-llama", "evict(score='keydiff', block=4, budget=8, window=1)")
    meta = json.loads((out / "graphwright.json").read_text())
    assert validate(dict(meta), out)["prefill_chunk"] == 4
    with pytest.raises(GraphwrightError, match=r"prefill_chunk: an integer in \[2, "):
        validate({**meta, "prefill_chunk": bad}, out)
