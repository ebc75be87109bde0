"""What an in-place KV cache would save on a dense ONNX decode step: a measurement prototype, not a runtime path.

Usage: ``python bench/proto_inplace_kv.py ART/smollm2_135m_identity S CAP ROUNDS THREADS [WORK_DIR]``

Rewrites an identity artifact's ``model.onnx`` (SmolLM2-135M layout: 30 layers, 3 KV heads, head dim 64,
batch 1) so that each ``<state>_next = Concat(<state>, new)`` becomes ``ScatterND(<state>, write index, new)``
on a buffer of CAP slots (empty slots have key position -1, which the graph's mask already drops), and runs one
decode step at cache length S both ways with I/O binding: the exported graph (outputs S + 1 long) and the
rewritten one with every state output bound to its own input (ORT's CPU ScatterND skips its copy when input
and output alias, so only the new row is written). Checks that the logits agree (printed) and the new row is
written, then times both alternating (ROUNDS x 6 steps; wall and process CPU per step, medians).
Session 10, loaded machine (indicative; one thread, CAP = S + 128): logits equal (difference 0); process CPU per
step 1.00-1.07x less at S = 256 (three runs: 1.07, 1.02, 1.00) and 1.12-1.23x less at S = 2048 (two runs).
A runtime version needs capacity states in ``graphwright.json`` and a runtime that keeps one buffer per state.
"""

from __future__ import annotations

import sys
import time

import numpy as np

HEADS, DIM, LAYERS, VOCAB = 3, 64, 30, 49152  # SmolLM2-135M


def rewrite(art: str, work: str) -> str:
    """``model.onnx`` with each state's Concat replaced by a ScatterND at the write index; returns its path."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(art + "/model.onnx")
    outs = {o.name for o in m.graph.output}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Concat" and n.output[0] in outs and n.output[0].endswith("_next"):
            index = "w_kp" if n.output[0] == "key_positions_next" else "w_kv"
            n = helper.make_node("ScatterND", [n.input[0], index, n.input[1]], [n.output[0]], name=n.name + "_inplace")
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.input.extend([helper.make_tensor_value_info("w_kv", TensorProto.INT64, [1, HEADS, 1, 3]),
                          helper.make_tensor_value_info("w_kp", TensorProto.INT64, [1, 1, 2])])
    path = work + "/inplace.onnx"
    onnx.save(m, path, save_as_external_data=True, location="inplace.onnx.data")
    return path


def bind(sess, feeds: dict, outs: dict):
    b = sess.io_binding()
    for k, a in feeds.items():
        b.bind_input(k, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
    for k, a in outs.items():
        b.bind_output(k, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
    return b


def main() -> None:
    import onnxruntime as ort

    if len(sys.argv) not in (6, 7):
        raise SystemExit(__doc__.split("\n\n")[1])
    art, S, C, rounds, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    work = sys.argv[6] if len(sys.argv) == 7 else "/tmp"
    if C <= S:
        raise SystemExit(f"CAP ({C}) must be larger than S ({S}): the step writes slot S")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = False
    base = ort.InferenceSession(art + "/model.onnx", so, providers=["CPUExecutionProvider"])
    inpl = ort.InferenceSession(rewrite(art, work), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    step = {"input_ids": np.array([[42]], np.int64), "positions": np.array([[S]], np.int64), "logits_index": np.array([0], np.int64)}
    kv = {f"{c}{i}": rng.standard_normal((1, HEADS, S, DIM), dtype=np.float32) for i in range(LAYERS) for c in "kv"}
    cap = {n: np.zeros((1, HEADS, C, DIM), np.float32) for n in kv}
    for n in kv:
        cap[n][:, :, :S] = kv[n]
    kpc = np.full((1, C), -1, np.int64)  # an empty slot: key position -1, masked by the graph
    kpc[0, :S] = np.arange(S)
    w_kv = np.array([[0, h, S] for h in range(HEADS)], np.int64).reshape(1, HEADS, 1, 3)
    w_kp = np.array([[[0, S]]], np.int64)
    logits_b, logits_i = np.empty((1, 1, VOCAB), np.float32), np.empty((1, 1, VOCAB), np.float32)
    out_b = {"logits": logits_b, "key_positions_next": np.empty((1, S + 1), np.int64),
             **{n + "_next": np.empty((1, HEADS, S + 1, DIM), np.float32) for n in kv}}
    # bound by pointer: every array must outlive the runs, so the dicts are kept
    in_b = {**step, "key_positions": np.arange(S, dtype=np.int64)[None], **kv}
    in_i = {**step, "key_positions": kpc, **cap, "w_kv": w_kv, "w_kp": w_kp}
    out_i = {"logits": logits_i, "key_positions_next": kpc, **{n + "_next": cap[n] for n in kv}}  # aliased: in place
    bb, bi = bind(base, in_b, out_b), bind(inpl, in_i, out_i)
    base.run_with_iobinding(bb)
    inpl.run_with_iobinding(bi)
    written = all(np.array_equal(cap[n][:, :, S], out_b[n + "_next"][:, :, S]) for n in kv)
    print(f"max |logit difference| in-place vs concat: {float(np.abs(logits_b - logits_i).max()):.3g}; new rows written: {written}")
    wall, cpu = {"concat": [], "inplace": []}, {"concat": [], "inplace": []}
    for _ in range(rounds):
        for name, sess, b in (("concat", base, bb), ("inplace", inpl, bi)):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(6):
                sess.run_with_iobinding(b)
            wall[name].append((time.perf_counter() - t0) / 6e-3)
            cpu[name].append((time.process_time() - c0) / 6e-3)
    ref = np.median(cpu["concat"])
    for name in wall:
        print(f"{name:<8} wall {np.median(wall[name]):7.2f} ms/step  CPU {np.median(cpu[name]):7.2f} ms/step  "
              f"(CPU x{ref / np.median(cpu[name]):.3f} vs concat)")


if __name__ == "__main__":
    main()
