"""ONNX export of issue 18's head-aware caches: ``duo``, ``duo + snapkv``/``h2o``/adaptive snapkv and the packed Ada-KV / PyramidKV cache.

Each artifact is compared with the torch runtime on a left-padded batch of 2: teacher-forced logits over
a 24-token prefill and 30 decode steps (<= 1e-4), greedy tokens over 24 new tokens (equal), the kept
tokens per head and the KV bytes (``kv_compare``). ``duo`` evicts in the prompt graph (``prompt_slots.py``)
and in the decode graph (``decode.onnx``), so does ``snapkv``; a latent streaming cache (``duo + lowrank_kv``)
stays a cut runtime op at the prompt step (``split.py``); the packed cache's slot ops are translated
(``codegen/onnx/packed_cache.py``) and ``evict_adakv`` is a cut runtime op. Each case's cache really
shrinks (below 0.7 of dense), so equal tokens are not the dense model's.
"""

from __future__ import annotations

import json

import onnx
import pytest

import graphwright as gw
from tests.onnx.kv_compare import assert_onnx_runs_like_torch

CASES = {
    # id: (model, recipe, runtime ops cut from the graph)
    # duo's streaming heads and snapkv evict inside model.onnx at the prompt step (prompt_slots.py): nothing cut
    "duo": ("tiny-llama", "duo(retrieval=[[0, 0]], sinks=2, window=4)", set()),
    "duo_qwen2": ("tiny-qwen2", "duo(retrieval=[[0, 1], [1, 0]], sinks=2, window=4)", set()),
    "duo+snapkv": ("tiny-llama", "duo(retrieval=[[0, 0]], sinks=2, window=4) + snapkv(budget=8, window=2)", set()),
    "duo+lowrank_kv": ("tiny-llama", "duo(retrieval=[[0, 0]], sinks=2, window=4) + lowrank_kv(keep=0.5)",
                       {"graphwright::evict_streaming"}),  # two latent caches in layer 0, streaming one evicted
    # duo + h2o: H2O on the retrieval heads evicts in the prompt graph and in decode.onnx, like duo: nothing cut
    "duo+h2o": ("tiny-llama", "duo(retrieval=[[0, 0]], sinks=2, window=4) + h2o(heavy=4, recent=3)", set()),
    # duo + Ada-KV: the packed cache over the retrieval heads (H_ret = 1 in layer 0, 2 in layer 1); evict_adakv cut
    "duo+adakv": ("tiny-llama", "duo(retrieval=[[0, 0], [1, 0], [1, 1]], sinks=2, window=4) + "
                  "snapkv(budget=8, window=2, heads='adaptive', floor=0.0)", {"graphwright::evict_adakv"}),
    "adakv": ("tiny-llama", "snapkv(budget=10, window=2, heads='adaptive', floor=0.0)", {"graphwright::evict_adakv"}),
    "pyramid_adakv": ("tiny-qwen2", "snapkv(budget=10, window=2, heads='adaptive', pyramid=20)", {"graphwright::evict_adakv"}),
}
GEN = dict(max_new_tokens=24, eos_token_id=[], pad_token_id=0)


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_torch(case, onnx_artifact):
    name, recipe, runtime_ops = CASES[case]
    cm, out = onnx_artifact(name, recipe)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    meta = json.loads((out / "graphwright.json").read_text())
    assert meta["verification"]["passed"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    assert {r["op"] for r in meta["runtime_ops"]} == runtime_ops
    # each graph's eviction traced once per kind and stitched, not the layer-by-layer fallback (slot_functions.py):
    # duo's head counts differ per layer (1 streaming head in layer 0, 2 in layer 1), so each function's
    # export example takes the larger one (a dynamic dim of size 1 is specialised by torch.export)
    assert not {"slot_functions", "decode_slot_functions"} & set(meta["export"]["notes"]), meta["export"]["notes"]
    nodes = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "Attention" in nodes and not any(n.startswith("graphwright") for n in nodes)
    rt = gw.load(out)

    torch_stats = assert_onnx_runs_like_torch(cm, rt, meta, GEN)
    assert torch_stats["kv_bytes"] < 0.7 * torch_stats["kv_bytes_dense"]
