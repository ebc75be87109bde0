"""A long prompt step's attention and column sums in query blocks on ONNX Runtime (``codegen/onnx/prompt_attention.py``,
``codegen/onnx/row_cone.py``).

Synthetic graphs in ONNX Runtime (GQA 6 query / 2 KV heads, batch 2, the second row left-padded, a past of 5 keys):
``Attention`` fed a mask built in the graph from positions, as ``translations.visibility`` builds it, rewritten with
blocks of 4 and 8 rows (T = 37: blocked; T = 1 and T <= block: the grouped and the short branch) gives the op's output
within 1e-6, and the main graph no longer builds the [B, 1, T, S] mask; the per-KV-head form (a Reshape folding heads
into the batch) too; a softmax column sum (``prompt_slots.prompt_colsum``'s shape) summed per block equals the
one-shot sum within 1e-5. Tiny-Llama StreamingLLM, H2O and SnapKV artifacts through ``OnnxStep`` with the rewrite off
and on (blocks of 4 rows, so a 12-token prompt runs in 3 blocks): the same kept positions, K/V states and logits
(<= 1e-5) after the prompt and over 24 greedy decode steps.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from graphwright.codegen.onnx import prompt_attention, row_cone
from graphwright.codegen.onnx.artifact import OnnxStep
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop

HQ, HK, D, P = 6, 2, 8, 5
LOWEST = float(np.finfo(np.float32).min)


def _const(name, vals, dims=None, dtype=TensorProto.INT64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(vals)] if dims is None
                                                                            else dims, vals))


def _mask_nodes(per_head: bool):
    """``translations.visibility``'s mask from positions: a key is seen when valid and not after the query, and a padding
    query row (position < 0) sees every valid key. Shared: [B, 1, T, S]; per KV head: [B*Hk, 1, T, S]."""
    nodes = [_const("zero", [0], []), _const("ax1", [1]), _const("ax3", [3]), _const("ax12", [1, 2]), _const("ax2", [2]),
             # [B, 1, 1, S]; per KV head: key positions [B, Hk, S] -> [B, Hk, 1, S]
             helper.make_node("Unsqueeze", ["kpos", "ax2" if per_head else "ax12"], ["kp"]),
             helper.make_node("Unsqueeze", ["qpos", "ax1"], ["qp1"]),
             helper.make_node("Unsqueeze", ["qp1", "ax3"], ["qp"]),  # [B, 1, T, 1]
             helper.make_node("LessOrEqual", ["kp", "qp"], ["le"]), helper.make_node("Less", ["qp", "zero"], ["qpad"]),
             helper.make_node("Or", ["le", "qpad"], ["vis"]), helper.make_node("GreaterOrEqual", ["kp", "zero"], ["kvalid"]),
             helper.make_node("And", ["vis", "kvalid"], ["m4" if per_head else "m"])]
    if per_head:  # one mask per KV head, folded into the batch like the per-KV-head graphs (Reshape [-1, 1, 0, 0])
        nodes += [_const("fold", [-1, 1, 0, 0]), helper.make_node("Reshape", ["m4", "fold"], ["m"])]
    return nodes


def _attention_model(per_head: bool):
    b, hq, hk = ("B2", HQ // HK, 1) if per_head else ("B", HQ, HK)
    nodes = [*_mask_nodes(per_head),
             helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], q_num_heads=hq, kv_num_heads=hk, scale=0.3)]
    graph = helper.make_graph(nodes, "att", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, hq, "T", D]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, hk, "S", D]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, hk, "S", D]),
        helper.make_tensor_value_info("qpos", TensorProto.INT64, ["B", "T"]),
        helper.make_tensor_value_info("kpos", TensorProto.INT64, ["B", HK, "S"] if per_head else ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        value_info=[helper.make_tensor_value_info("m", TensorProto.BOOL, [b, 1, "T", "S"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _positions(T, pad=9):
    """Query positions [2, T] after a past of P keys (row 1 left-padded by ``pad``) and key positions [2, P + T]."""
    pad = min(pad, T - 1)
    q = np.stack([np.arange(P, P + T), np.concatenate([-np.ones(pad), np.arange(P, P + T - pad)])]).astype(np.int64)
    return q, np.concatenate([np.tile(np.arange(P), (2, 1)), q], 1)


def _run(model, feeds, out="y"):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run([out], feeds)[0]


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_kv_head"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "attention"])
def test_blocked_attention_equals_the_op(per_head, grouped):
    rng = np.random.default_rng(3)
    b, hq, hk = (2 * HK, HQ // HK, 1) if per_head else (2, HQ, HK)
    for T in (37, 6, 1):
        qpos, kpos = _positions(T)
        if per_head:  # each KV head its own key positions: head 1 has lost its second past key (position -1)
            kpos = np.repeat(kpos[:, None], HK, axis=1)
            kpos[:, 1, 1] = -1
        feeds = {"q": rng.standard_normal((b, hq, T, D), dtype=np.float32),
                 "k": rng.standard_normal((b, hk, P + T, D), dtype=np.float32),
                 "v": rng.standard_normal((b, hk, P + T, D), dtype=np.float32), "qpos": qpos, "kpos": kpos}
        want = _run(_attention_model(per_head), feeds)
        for block in (4, 8):
            model = _attention_model(per_head)
            assert prompt_attention.rewrite(model, block, grouped) == 1
            ops = [n.op_type for n in model.graph.node]
            # the [., T, S] mask is no longer built in the main graph: per block in the loop, whole in the short branch
            assert "Attention" not in ops and not {"LessOrEqual", "Or", "And"} & set(ops), ops
            got = _run(model, feeds)
            assert got.shape == want.shape
            assert np.abs(got - want).max() < 1e-6, (T, block)


def test_blocks_read_keys_up_to_the_causal_edge_unless_the_mask_sees_past_it():
    """The block's keys stop at S - T + b; a row that sees a later key (here: every key visible) keeps them all."""
    rng = np.random.default_rng(4)
    T = 21
    qpos, kpos = _positions(T, pad=0)
    feeds = {"q": rng.standard_normal((2, HQ, T, D), dtype=np.float32),
             "k": rng.standard_normal((2, HK, P + T, D), dtype=np.float32),
             "v": rng.standard_normal((2, HK, P + T, D), dtype=np.float32), "qpos": qpos, "kpos": kpos}
    see_all = dict(feeds, qpos=np.full_like(qpos, -1))  # padding rows only: each sees every valid key, later ones too
    for f in (feeds, see_all):
        model = _attention_model(False)
        prompt_attention.rewrite(model, 4)
        assert np.abs(_run(model, f) - _run(_attention_model(False), f)).max() < 1e-6


def _colsum_model():
    """``prompt_slots.prompt_colsum``'s ONNX shape: [B, Hk, g, T, S] scores of the queries, masked, softmaxed, weighted by
    the real query rows and summed over the rows (axis 3)."""
    g = HQ // HK
    nodes = [*_mask_nodes(False), _const("ax3s", [3]),
             _const("lowest", [LOWEST], [], TensorProto.FLOAT), _const("scale", [0.3], [], TensorProto.FLOAT),
             _const("q5", [0, HK, g, -1, D]), helper.make_node("Reshape", ["q", "q5"], ["qg"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("Unsqueeze", ["kt", "ax2"], ["kt5"]),
             helper.make_node("MatMul", ["qg", "kt5"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
             helper.make_node("Unsqueeze", ["m", "ax2"], ["m5"]), helper.make_node("Not", ["m5"], ["hidden"]),
             helper.make_node("Where", ["hidden", "lowest", "ss"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("GreaterOrEqual", ["qp", "zero"], ["real"]), helper.make_node("Unsqueeze", ["real", "ax2"], ["real5"]),
             helper.make_node("Cast", ["real5"], ["w"], to=TensorProto.FLOAT), helper.make_node("Mul", ["p", "w"], ["pw"]),
             helper.make_node("ReduceSum", ["pw", "ax3s"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "colsum", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", HQ, "T", D]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", HK, "S", D]),
        helper.make_tensor_value_info("qpos", TensorProto.INT64, ["B", "T"]),
        helper.make_tensor_value_info("kpos", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_blocked_column_sums_equal_the_one_shot_sum():
    rng = np.random.default_rng(5)
    for T in (37, 3):
        qpos, kpos = _positions(T)
        feeds = {"q": rng.standard_normal((2, HQ, T, D), dtype=np.float32),
                 "k": rng.standard_normal((2, HK, P + T, D), dtype=np.float32), "qpos": qpos, "kpos": kpos}
        want = _run(_colsum_model(), feeds)
        model = _colsum_model()
        assert prompt_attention.rewrite(model, 8) == 1
        ops = [n.op_type for n in model.graph.node]
        assert "Softmax" not in ops and "MatMul" not in ops, ops  # the [., T, S] probabilities are built per block
        got = _run(model, feeds)
        assert got.shape == want.shape == (2, HK, HQ // HK, P + T)
        assert np.abs(got - want).max() < 1e-5
        if T <= 8:  # one block: the same sum, its masked_fill as an additive mask (bit-exact before the Softmax)
            assert np.array_equal(got, want)
    short = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "else_branch")
    ops = [n.op_type for n in short.node]
    assert ops.count("Where") == 1 and "Add" in ops  # Where(c, lowest, x) -> Add(x, Where(c, lowest, 0))
    where = next(n for n in short.node if n.op_type == "Where")
    assert where.input[2] != "ss" and where.input[1] == "lowest"


def _with_block_edges(model):
    """``model`` (rewritten) with a second output ``edges``: the key columns ``e`` each block of the column sum's loop read."""
    from onnx import TensorProto

    branch = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    loop = next(n for n in branch.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    e = next(n.output[0] for n in body.node if n.output[0].endswith("_e"))
    body.output.append(helper.make_tensor_value_info(e, TensorProto.INT64, [1]))
    loop.output.append("edges")
    branch.output.append(helper.make_tensor_value_info("edges", TensorProto.INT64, None))
    short = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "else_branch")
    short.node.append(_const("no_edges", [0], [1, 1]))
    short.output.append(helper.make_tensor_value_info("no_edges", TensorProto.INT64, None))
    top_if = next(n for n in model.graph.node if n.op_type == "If")
    top_if.output.append("edges")
    model.graph.output.append(helper.make_tensor_value_info("edges", TensorProto.INT64, None))
    return model


def test_blocked_column_sums_stop_at_each_blocks_causal_edge(monkeypatch):
    """A block of rows [a, b) computes the probabilities of keys [0, S - T + b) only and pads its sum with exact zeros:
    the same sum bit for bit as every column; a block with a row that sees a later key (a left-padded batch's padding
    rows see every valid key) reads all S."""
    import onnxruntime as ort

    rng = np.random.default_rng(6)
    T, S = 37, P + 37
    for pad, want_edges in ((0, [13, 21, 29, 37, S]), (9, [S, S, 29, 37, S]), (T, [S] * 5)):
        qpos, kpos = _positions(T, pad=pad)
        if pad == T:
            qpos = np.full_like(qpos, -1)  # every row a padding row: each sees every valid key
        feeds = {"q": rng.standard_normal((2, HQ, T, D), dtype=np.float32),
                 "k": rng.standard_normal((2, HK, S, D), dtype=np.float32), "qpos": qpos, "kpos": kpos}
        sums = {}
        for on in (True, False):
            monkeypatch.setattr(prompt_attention, "CAUSAL_COLUMNS", on)
            model = _colsum_model()
            assert prompt_attention.rewrite(model, 8) == 1
            sums[on] = _run(model, feeds)
        assert np.array_equal(sums[True], sums[False]), pad
        assert np.abs(sums[True] - _run(_colsum_model(), feeds)).max() < 1e-5
        monkeypatch.setattr(prompt_attention, "CAUSAL_COLUMNS", True)
        model = _colsum_model()
        prompt_attention.rewrite(model, 8)
        got = ort.InferenceSession(_with_block_edges(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(
            ["y", "edges"], feeds)
        assert np.array_equal(got[0], sums[True])
        assert got[1].reshape(-1).tolist() == want_edges, pad


def test_cone_stops_at_nodes_that_are_not_row_wise_and_needs_ranks():
    model = _colsum_model()
    g = row_cone.Graph(model)
    nodes, leaves = row_cone.cone("pw", g)
    # MatMul: rows from input 0 (a Reshape that moves the rows: a leaf, sliced); the keys (input 1) are read whole
    assert "qg" in leaves and "kt5" not in leaves
    # the mask is rebuilt from the positions (an Unsqueeze before the last two axes keeps the rows)
    assert {"kp", "qp"} <= set(leaves) and "m5" not in leaves
    assert {n.op_type for n in nodes} >= {"MatMul", "Where", "Softmax", "Mul", "Cast", "Unsqueeze", "And", "Or"}
    # the columns: the keys (MatMul input 1) and the key positions; not the queries, whose last axis is summed over
    assert row_cone.column_tensors((nodes, leaves), g, "pw") == ["kp", "kt5"]
    # the key positions also read where their last axis is not the columns (as a MatMul's input 0): no cut
    extra = helper.make_node("MatMul", ["kp", "kt5"], ["kp_mm"])
    both = [*nodes[:-1], extra, helper.make_node("Mul", ["p", "kp_mm"], ["pw2"])]
    assert row_cone.column_tensors((both, leaves), g, "pw2") is None
    assert prompt_attention._softmax_mask((nodes, leaves), g, "pw") == ("hidden", True)
    add = [helper.make_node("Add", ["p", "w"], ["pw"]) if nd.output[0] == "pw" else nd for nd in nodes]
    assert prompt_attention._softmax_mask((add, leaves), g, "pw") is None  # p + w is not 0 where p is: every column
    g.dims.pop("qg")  # a leaf of unknown rank: the cone cannot be sliced
    assert row_cone.cone("pw", g) is None


@pytest.mark.parametrize("recipe", ["streaming(sinks=2, window=6)", "h2o(heavy=4, recent=4)", "snapkv(budget=6, window=2)"])
def test_artifact_prompt_in_blocks_keeps_and_decodes_the_same(onnx_artifact, recipe, monkeypatch):
    cm, folder = onnx_artifact("tiny-llama", recipe)
    meta = json.loads((folder / "graphwright.json").read_text())
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=8)
    monkeypatch.setattr(prompt_attention, "BLOCK", 4)  # the 12-token prompt runs in 3 blocks of rows
    counts, rewrite = [], prompt_attention.rewrite
    monkeypatch.setattr(prompt_attention, "rewrite", lambda proto: counts.append(rewrite(proto)) or counts[-1])
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(prompt_attention, "ENABLED", enabled)
        step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
        prompt_states = []

        def keep_prompt_state(i, state, into=prompt_states):
            if i == 0:
                into.append(state)

        runs[enabled] = (*decode_loop(SimpleNamespace(step_graph=cm.step_graph, _step=step), ids, mask, 24,
                                      on_step=keep_prompt_state), prompt_states[0])
    n_layers = cm.step_graph.info.num_layers
    # model.onnx: every layer's attention, and H2O's / SnapKV's column sums of the prompt step's probabilities;
    # decode.onnx (single-token steps only) is left to decode_attention
    assert counts == [n_layers * (1 if recipe.startswith("streaming") else 2)], counts
    (la, ta, _, pa), (lb, tb, _, pb) = runs[False], runs[True]
    for x, y in zip(pa, pb):  # after the prompt step: the same kept positions, K/V (and H2O's scores) to rounding
        assert x.shape == y.shape
        if x.dtype.is_floating_point:
            assert (x - y).abs().max().item() < 1e-5
        else:
            assert torch.equal(x, y)
    assert torch.equal(ta, tb)
    assert (la - lb).abs().max().item() < 1e-5


@pytest.mark.parametrize("recipe", ["streaming(sinks=2, window=6)", "h2o(heavy=4, recent=4)"])
def test_each_layers_state_is_written_before_the_next_layers_attention(onnx_artifact, recipe, monkeypatch):
    """``state_order``: a state output computed before an attention ``If`` becomes its ancestor (ONNX Runtime can no
    longer keep the layer's whole K/V alive to the end of the step); the step's values do not change."""
    import onnx

    from graphwright.codegen.onnx import state_order

    cm, folder = onnx_artifact("tiny-llama", recipe)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert prompt_attention.rewrite(proto) == cm.step_graph.info.num_layers * (1 if recipe.startswith("streaming") else 2)
    anchors = prompt_attention.anchors(proto)
    order = [nd.name for nd in proto.graph.node if nd.name in anchors]
    assert len(order) == cm.step_graph.info.num_layers
    states = [o.name for o in proto.graph.output if o.name != "logits"]
    assert state_order.rewrite(proto, anchors) == len(states) - len(states) // cm.step_graph.info.num_layers  # the last layer's wait for nothing
    producer = {o: nd for nd in proto.graph.node for o in nd.output}

    def ancestors(name, seen):
        nd = producer.get(name)
        if nd is None or name in seen:
            return seen
        seen.add(name)
        for i in nd.input:
            ancestors(i, seen)
        return seen

    second = next(nd for nd in proto.graph.node if nd.name == order[1])
    before = ancestors(second.input[0], set())
    assert all(s in before for s in states if s.startswith(("k0_", "v0_"))), states[:4]  # layer 0's state, then layer 1
    assert not any(s in before for s in states if s.startswith(("k1_", "v1_")))
    monkeypatch.setattr(prompt_attention, "BLOCK", 4)
    _assert_switch_changes_no_value(cm, folder, state_order, monkeypatch, seed=5)  # the same nodes in another order


def _assert_switch_changes_no_value(cm, folder, module, monkeypatch, seed):
    """A left-padded prompt and 8 greedy steps through ``OnnxStep`` with ``module.ENABLED`` off and on: the same logits,
    tokens and final state, bit for bit."""
    meta = json.loads((folder / "graphwright.json").read_text())
    ids, mask = left_padded_batch(cm.step_graph.info.vocab_size, [12, 7], seed=seed)
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(module, "ENABLED", enabled)
        step = OnnxStep.from_metadata(folder / "model.onnx", meta, providers=["CPUExecutionProvider"])
        runs[enabled] = decode_loop(SimpleNamespace(step_graph=cm.step_graph, _step=step), ids, mask, 8)
    (la, ta, sa), (lb, tb, sb) = runs[False], runs[True]
    assert torch.equal(ta, tb) and torch.equal(la, lb)
    assert all(torch.equal(x, y) for x, y in zip(sa, sb))


def test_mlp_rows_in_blocks_give_the_same_step(onnx_artifact, monkeypatch):
    """``prompt_rows``: every layer's MLP residual (not the attention's, whose branch reads the attention output) runs
    in blocks of rows in a prompt-only graph; the same ops on the same rows, so the same values bit for bit."""
    import onnx

    from graphwright.codegen.onnx import prompt_rows

    cm, folder = onnx_artifact("tiny-llama", "streaming(sinks=2, window=6)")
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert prompt_rows.rewrite(proto, block=4) == cm.step_graph.info.num_layers
    loops = [nd for nd in proto.graph.node if nd.name.startswith("gw_prompt_rows") and nd.op_type == "Loop"]
    assert len(loops) == cm.step_graph.info.num_layers
    # gate, up, down: once each, in the loop (a second copy would prepack its weights twice in ONNX Runtime)
    assert all(sum(x.op_type == "MatMul" for x in nd.attribute[0].g.node) == 3 for nd in loops)
    assert sum(nd.op_type == "MatMul" for nd in proto.graph.node) == sum(
        nd.op_type == "MatMul" for nd in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node) - 3 * len(loops)
    monkeypatch.setattr(prompt_rows, "BLOCK", 4)  # the 12-token prompt's MLP in 3 blocks of rows
    _assert_switch_changes_no_value(cm, folder, prompt_rows, monkeypatch, seed=6)
