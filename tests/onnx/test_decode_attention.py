"""One-query-row attention as grouped MatMuls on ONNX Runtime (``codegen/onnx/decode_attention.py``).

The rewritten node against opset-23 ``Attention`` in ONNX Runtime (GQA 6 query / 2 KV heads, batch 2, random
boolean masks with every row seeing a key): T = 1 through the grouped branch and T = 3 through the kept Attention, a
dynamic query length (an ``If``) and a static one (grouped nodes inline), shared positions (mask [B, 1, T, S])
and per-KV-head positions (q [B*Hk, g, T, D], one KV head): outputs within 1e-5. Nodes that must keep their Attention (an additive float mask, a read second
output) are left alone. Tiny-Llama artifacts through ``OnnxStep``, rewrite on and off: the dense in-place graph, a
DuoAttention decode graph (per-head positions, the streaming heads evicting every step) and a StreamingLLM one;
a prompt step then 40 greedy decode steps on a left-padded batch give the same tokens and logits within 1e-5.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from graphwright.codegen.onnx import decode_attention, prompt_attention
from graphwright.codegen.onnx.artifact import OnnxStep
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop

HQ, HK, D = 6, 2, 8


def _dims(layout):
    """(batch, query heads, KV heads): the shared-positions form, or per-KV-head positions (translations.attention:
    each KV head's query group its own batch entry, one KV head)."""
    return (2, HQ, HK) if layout == "shared" else (2 * HK, HQ // HK, 1)


def _model(T, layout, mask_type=TensorProto.BOOL, extra_output=False):
    b, hq, hk = _dims(layout)
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, hq, T, D])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, hk, "S", D])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, hk, "S", D])
    m = helper.make_tensor_value_info("m", mask_type, [b, 1, T, "S"])
    outs = ["y", "present_k"] if extra_output else ["y"]
    node = helper.make_node("Attention", ["q", "k", "v", "m"], outs, scale=0.3, q_num_heads=hq, kv_num_heads=hk)
    graph = helper.make_graph([node], "att", [q, k, v, m],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _run(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]


def _feeds(T, S, layout, seed):
    b, hq, hk = _dims(layout)
    rng = np.random.default_rng(seed)
    m = rng.random((b, 1, T, S)) < 0.6
    m[..., 0] = True  # every query row sees a key
    return {"q": rng.standard_normal((b, hq, T, D), dtype=np.float32),
            "k": rng.standard_normal((b, hk, S, D), dtype=np.float32),
            "v": rng.standard_normal((b, hk, S, D), dtype=np.float32), "m": m}


@pytest.mark.parametrize("layout", ["shared", "per_kv_head"])
@pytest.mark.parametrize("static_t", [False, True])
def test_rewritten_node_equals_attention(layout, static_t):
    for T, S in [(1, 5), (1, 40), (3, 17)]:
        if static_t and T != 1:
            continue
        model = _model(T if static_t else "T", layout)
        rewritten = _model(T if static_t else "T", layout)
        assert decode_attention.rewrite(rewritten) == 1
        ops = [n.op_type for n in rewritten.graph.node]
        assert ("If" in ops) != static_t and "Attention" not in ops
        feeds = _feeds(T, S, layout, seed=T * 100 + S)
        want, got = _run(model, feeds), _run(rewritten, feeds)
        b, hq, _ = _dims(layout)
        assert want.shape == got.shape == (b, hq, T, D)
        assert np.abs(want - got).max() < 1e-5


def test_nodes_that_keep_their_attention():
    float_mask = _model("T", "shared", mask_type=TensorProto.FLOAT)
    assert decode_attention.rewrite(float_mask) == 0
    assert [n.op_type for n in float_mask.graph.node] == ["Attention"]
    second_output = _model("T", "shared", extra_output=True)
    assert decode_attention.rewrite(second_output) == 0
    node = second_output.graph.node[0]
    assert decode_attention._eligible(node, decode_attention._types(second_output.graph),
                                      {"present_k"}) == "a second output is read"


RECIPES = ["identity", "duo(retrieval=[[0, 0]], sinks=2, window=4)", "streaming(sinks=2, window=5)"]


def _graphs(folder, meta):
    files = [folder / "model.onnx"] + ([folder / meta["decode"]["model_file"]] if meta.get("decode") else [])
    return [onnx.load(str(f), load_external_data=False) for f in files]


@pytest.mark.parametrize("recipe", RECIPES)
def test_artifact_decodes_the_same_with_grouped_attention(onnx_artifact, recipe, monkeypatch):
    cm, folder = onnx_artifact("tiny-llama", recipe)
    meta = json.loads((folder / "graphwright.json").read_text())
    attentions = [sum(n.op_type == "Attention" for n in g.graph.node) for g in _graphs(folder, meta)]
    assert [decode_attention.rewrite(g) for g in _graphs(folder, meta)] == attentions and attentions[0] > 0
    # StreamingLLM's decode graph attends without the op (decode_rows.SPLIT_ROWS: old slots read in place); the others
    # keep it there too
    assert (attentions[-1] > 0) == (not recipe.startswith("streaming"))
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=6)
    # decode_attention alone: prompt_attention.py (tested in test_prompt_attention.py) would take model.onnx's nodes
    monkeypatch.setattr(prompt_attention, "ENABLED", False)
    runs, rewritten, rewrite = {}, [], decode_attention.rewrite
    monkeypatch.setattr(decode_attention, "rewrite", lambda proto: rewritten.append(rewrite(proto)) or rewritten[-1])
    for enabled in (False, True):
        monkeypatch.setattr(decode_attention, "ENABLED", enabled)
        step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
        runs[enabled] = decode_loop(SimpleNamespace(step_graph=cm.step_graph, _step=step), ids, mask, 40)
    assert rewritten == attentions  # the sessions ran the rewritten graphs (model.onnx, then decode.onnx)
    (la, ta, _), (lb, tb, _) = runs[False], runs[True]
    assert torch.equal(ta, tb)
    assert (la - lb).abs().max().item() < 1e-5
