"""One layer's prompt attention in ONNX Runtime: which op pattern is fastest at long prompts (issue 17).

The ONNX prefill of a 3k-token prompt was ~2.5x the torch one, and ORT's opset-23 ``Attention``
kernel was most of it. This script times one layer's attention (SmolLM2-135M shape: 9 query heads,
3 KV heads, head dim 64) at a prompt of T tokens, alternating in one process, as single-node
ONNX graphs run by ORT and as torch SDPA:

* ``ort_attention_mask``: ``Attention`` with a boolean [T, T] causal mask (what ``translations.attention``
  emits for a first prompt step, per KV group);
* ``ort_attention_causal``: ``Attention(is_causal=1)``, no mask;
* ``ort_matmul_softmax``: MatMul (the g query heads of a KV head folded into the rows), additive fp32
  mask, Softmax, MatMul;
* ``ort_blocked_<op>``: the queries in blocks of ``--block`` rows, block i against keys 0..end_i
  only (the upper triangle is never computed), unrolled for this T;
* ``torch_sdpa_mask`` / ``torch_sdpa_causal``: ``scaled_dot_product_attention`` with the boolean mask / is_causal.

Usage: ``python bench/bench_prompt_attention.py --T 3058 --repeats 3`` (prints median seconds per
variant and the max |difference| to torch). Timings are only meaningful on an idle machine; the
load average before and after is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from graphwright.bench.timing import alternate

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs):
    g = helper.make_graph(nodes, "attn", inputs, outputs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _io(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def attention_model(H, Hk, T, D, scale, causal: bool):
    ins = [_io("q", F, [1, H, T, D]), _io("k", F, [1, Hk, T, D]), _io("v", F, [1, Hk, T, D])]
    args = ["q", "k", "v"]
    if not causal:
        ins.append(_io("mask", TensorProto.BOOL, [T, T]))
        args.append("mask")
    node = helper.make_node("Attention", args, ["y"], scale=scale, q_num_heads=H, kv_num_heads=Hk, is_causal=int(causal))
    return _model([node], ins, [_io("y", F, [1, H, T, D])])


def matmul_model(H, Hk, T, D, scale):
    g = H // Hk
    c = lambda name, vals: helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_t", TensorProto.INT64, [len(vals)], vals))  # noqa: E731
    nodes = [c("s_q", [1, Hk, g * T, D]), c("s_5", [1, Hk, g, T, T]), c("s_4", [1, Hk, g * T, T]), c("s_o", [1, H, T, D]),
             helper.make_node("Reshape", ["q", "s_q"], ["qg"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qg", "kt"], ["s"]),
             helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("sc", F, [], [scale])),
             helper.make_node("Mul", ["s", "scale"], ["ss"]),
             helper.make_node("Reshape", ["ss", "s_5"], ["s5"]),
             helper.make_node("Add", ["s5", "mask"], ["sm"]),
             helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
             helper.make_node("Reshape", ["p", "s_4"], ["p4"]),
             helper.make_node("MatMul", ["p4", "v"], ["o"]),
             helper.make_node("Reshape", ["o", "s_o"], ["y"])]
    ins = [_io("q", F, [1, H, T, D]), _io("k", F, [1, Hk, T, D]), _io("v", F, [1, Hk, T, D]), _io("mask", F, [T, T])]
    return _model(nodes, ins, [_io("y", F, [1, H, T, D])])


def blocked_model(H, Hk, T, D, scale, block: int, inner: str):
    """Query blocks of ``block`` rows, block i against keys [0, end_i): ``inner`` = "attention" or "matmul"."""
    g = H // Hk
    nodes, outs = [], []

    def const(name, vals, dtype=TensorProto.INT64):
        nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_t", dtype, [len(vals)], vals)))
        return name

    const("ax2", [2])
    const("ax3", [3])
    const("zero", [0])
    nodes.append(helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("sc", F, [], [scale])))
    for i, a in enumerate(range(0, T, block)):
        b = min(T, a + block)
        n = b - a
        qa, qb, kb = const(f"qa{i}", [a]), const(f"qb{i}", [b]), const(f"kb{i}", [b])
        nodes += [helper.make_node("Slice", ["q", qa, qb, "ax2"], [f"q{i}"]),
                  helper.make_node("Slice", ["k", "zero", kb, "ax2"], [f"k{i}"]),
                  helper.make_node("Slice", ["v", "zero", kb, "ax2"], [f"v{i}"])]
        if inner == "attention":
            nodes += [helper.make_node("Slice", ["maskb", qa, qb, "zero"], [f"mr{i}"]),
                      helper.make_node("Slice", [f"mr{i}", "zero", kb, const(f"one{i}", [1])], [f"m{i}"]),
                      helper.make_node("Attention", [f"q{i}", f"k{i}", f"v{i}", f"m{i}"], [f"y{i}"], scale=scale,
                                       q_num_heads=H, kv_num_heads=Hk)]
        else:
            nodes += [helper.make_node("Slice", ["mask", qa, qb, "zero"], [f"mr{i}"]),
                      helper.make_node("Slice", [f"mr{i}", "zero", kb, const(f"one{i}", [1])], [f"m{i}"]),
                      helper.make_node("Reshape", [f"q{i}", const(f"sq{i}", [1, Hk, g * n, D])], [f"qg{i}"]),
                      helper.make_node("Transpose", [f"k{i}"], [f"kt{i}"], perm=[0, 1, 3, 2]),
                      helper.make_node("MatMul", [f"qg{i}", f"kt{i}"], [f"s{i}"]),
                      helper.make_node("Mul", [f"s{i}", "scale"], [f"ss{i}"]),
                      helper.make_node("Reshape", [f"ss{i}", const(f"s5{i}", [1, Hk, g, n, b])], [f"s5_{i}"]),
                      helper.make_node("Add", [f"s5_{i}", f"m{i}"], [f"sm{i}"]),
                      helper.make_node("Softmax", [f"sm{i}"], [f"p{i}"], axis=-1),
                      helper.make_node("Reshape", [f"p{i}", const(f"s4{i}", [1, Hk, g * n, b])], [f"p4{i}"]),
                      helper.make_node("MatMul", [f"p4{i}", f"v{i}"], [f"o{i}"]),
                      helper.make_node("Reshape", [f"o{i}", const(f"so{i}", [1, H, n, D])], [f"y{i}"])]
        outs.append(f"y{i}")
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=2))
    mask_in = _io("maskb", TensorProto.BOOL, [T, T]) if inner == "attention" else _io("mask", F, [T, T])
    ins = [_io("q", F, [1, H, T, D]), _io("k", F, [1, Hk, T, D]), _io("v", F, [1, Hk, T, D]), mask_in]
    return _model(nodes, ins, [_io("y", F, [1, H, T, D])])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=3058)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    H, Hk, T, D = a.heads, a.kv_heads, a.T, a.dim
    scale = D ** -0.5
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, H, T, D, generator=g), torch.randn(1, Hk, T, D, generator=g), torch.randn(1, Hk, T, D, generator=g)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    add = torch.zeros(T, T).masked_fill(~causal, torch.finfo(torch.float32).min)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.log_severity_level = 3  # the blocked graphs leave unused constants: no warnings
    models = {"ort_attention_mask": (attention_model(H, Hk, T, D, scale, False), {"mask": causal.numpy()}),
              "ort_attention_causal": (attention_model(H, Hk, T, D, scale, True), {}),
              "ort_matmul_softmax": (matmul_model(H, Hk, T, D, scale), {"mask": add.numpy()})}
    for blk in a.block:
        models[f"ort_blocked{blk}_attention"] = (blocked_model(H, Hk, T, D, scale, blk, "attention"), {"maskb": causal.numpy()})
        models[f"ort_blocked{blk}_matmul"] = (blocked_model(H, Hk, T, D, scale, blk, "matmul"), {"mask": add.numpy()})
    runs = {name: (ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), extra)
            for name, (m, extra) in models.items()}
    kk, vv = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    fns = {name: (lambda s=s, e=e: s.run(["y"], {**feeds, **e})[0]) for name, (s, e) in runs.items()}
    fns["torch_sdpa_mask"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=causal, scale=scale).numpy()
    fns["torch_sdpa_causal"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale).numpy()
    want = fns["torch_sdpa_mask"]()
    print(f"T={T} H={H} Hk={Hk} D={D} threads={a.threads} load average before: {os.getloadavg()}")
    for name, fn in fns.items():  # warm-up + check
        print(f"{name:28s} max|diff| vs torch {float(np.abs(fn() - want).max()):.2e}")
    times = alternate(fns, a.repeats)
    base = statistics.median(times["torch_sdpa_mask"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:28s} median {m:7.3f} s  ({m / base:4.2f}x torch_sdpa_mask)  runs {[round(t, 3) for t in ts]}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
