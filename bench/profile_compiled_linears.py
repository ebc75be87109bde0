"""One decode GEMV (1 row x SmolLM2-135M's weight shapes), per kernel a decode step could run it with.

Session 14 (loaded machine, ``--step``, 2 threads): F.linear 45.8 ms CPU per step's linears, x@Wt 36.0,
mm_stride0 36.4, x@Wt_thp 34.5, mkl_linear 36.5: the compiled step's packed MKL linears already run at
the [in, out] copies' rate (huge pages: ~4%, within the load's noise).

Usage:

    python bench/profile_compiled_linears.py --threads 2 --rounds 7

Kernels, alternating in one process (round robin, ``--rounds`` rounds, median per kernel):

* ``F.linear``: ``F.linear(x, W)``, W [out, in] as HF stores it (MKL's transposed-B GEMV; the
  compiled step's linears without ``freezing``);
* ``x@Wt``: ``x @ Wt`` with ``Wt`` = ``W.t()`` stored contiguous [in, out] (the torch backend's eager
  decode, ``decode_linear.py``);
* ``x@Wt_thp``: the same on a copy in memory advised for transparent huge pages
  (``madvise(MADV_HUGEPAGE)``: 2 MB pages, fewer TLB misses while streaming the weight);
* ``mkl_linear``: ``mkl._mkl_linear`` on ``mkl._mkl_reorder_linear_weight(W, 1)`` (what Inductor's
  ``freezing`` + ``cpp.weight_prepack`` make of a constant-weight linear: the compiled decode step);
* ``mkldnn_linear``: oneDNN's ``mkldnn._linear_pointwise`` on ``mkldnn._reorder_linear_weight``;
* ``ort``: ONNX Runtime ``MatMul`` with the [in, out] weight as an initializer (MLAS, what the ONNX
  export runs), when ``onnxruntime`` and ``onnx`` are installed.

``--step``: instead of one weight at a time, one decode step's linears (30 layers x q, k, v, o,
gate, up, down, then the LM head: 538 MB of distinct fp32 weights, streamed from memory as in the
model) per kernel, plus ``mm_stride0``: ``torch.mm`` on the [in, out] copies with the row given
stride 0, the way Inductor's output code passes a 1-row activation to ``extern_kernels.mm``.

Reported: process CPU ms (all threads) and wall ms per call, the weight's GB/s at the wall time,
and each kernel's CPU-time speed-up over ``F.linear``. On a machine shared with other jobs the
CPU time is the steadier figure; wall numbers are then direction only.
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): q/o, k/v, gate/up, down, lm_head


def ort_matmul(wt: torch.Tensor, threads: int):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    K, N = wt.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(wt.numpy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into anonymous memory advised for transparent huge pages (the mapping lives with the tensor)."""
    import mmap

    m = mmap.mmap(-1, max(t.numel() * t.element_size(), mmap.PAGESIZE))
    m.madvise(mmap.MADV_HUGEPAGE)
    out = torch.frombuffer(m, dtype=t.dtype, count=t.numel()).view(t.shape)
    out.copy_(t)
    return out


def kernels(W: torch.Tensor, threads: int) -> dict:
    wt = W.t().contiguous()
    wt_thp = huge_page_copy(wt)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(W, 1)
    dnn = torch.ops.mkldnn._reorder_linear_weight(W, 1)
    out = {"F.linear": lambda x: F.linear(x, W),
           "x@Wt": lambda x: x @ wt,
           "x@Wt_thp": lambda x: x @ wt_thp,
           "mkl_linear": lambda x: torch.ops.mkl._mkl_linear(x, packed, W, None, 1),
           "mkldnn_linear": lambda x: torch.ops.mkldnn._linear_pointwise(x, dnn, None, "none", [], "")}
    ort = ort_matmul(wt, threads)
    if ort is not None:
        out["ort"] = ort
    return out


LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def step_kernels(threads: int, layers: int = 30) -> tuple[dict, int]:
    """Per kernel, a function running one decode step's linears on distinct weights; the weights' bytes."""
    g = torch.Generator().manual_seed(0)
    shapes = LAYER * layers + [(49152, 576)]
    ws = [torch.randn(N, K, generator=g) * 0.05 for N, K in shapes]
    wts = [w.t().contiguous() for w in ws]
    thp = [huge_page_copy(w) for w in wts]
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in ws]
    xs = {K: torch.randn(1, K, generator=g) for K in (576, 1536)}
    x0 = {K: x.as_strided((1, K), (0, 1)) for K, x in xs.items()}

    def run(fn):
        def step():
            for i, (_, K) in enumerate(shapes):
                fn(i, K)
        return step

    out = {"F.linear": run(lambda i, K: F.linear(xs[K], ws[i])),
           "x@Wt": run(lambda i, K: torch.mm(xs[K], wts[i])),
           "mm_stride0": run(lambda i, K: torch.mm(x0[K], wts[i])),
           "x@Wt_thp": run(lambda i, K: torch.mm(xs[K], thp[i])),
           "mkl_linear": run(lambda i, K: torch.ops.mkl._mkl_linear(xs[K], packed[i], ws[i], None, 1))}
    return out, sum(4 * N * K for N, K in shapes)


def main_step(args) -> int:
    fns, nbytes = step_kernels(args.threads)
    cpu, wall = {k: [] for k in fns}, {k: [] for k in fns}
    for r in range(args.rounds + 1):
        for name, f in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            if r:  # round 0 warms up
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    base = median(cpu["F.linear"])
    print(f"one decode step's linears ({nbytes / 1e6:.0f} MB of weights), {args.threads} threads, {args.rounds} rounds:")
    for name in fns:
        c, w = median(cpu[name]), median(wall[name])
        print(f"  {name:14s} CPU {1e3 * c:8.2f} ms  wall {1e3 * w:8.2f} ms  {nbytes / w / 1e9:6.1f} GB/s  "
              f"{base / c:5.2f}x F.linear (CPU)", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200, help="calls per kernel and round (lm_head: 1/10 of it)")
    p.add_argument("--step", action="store_true", help="one decode step's linears per kernel (see the module doc)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.step:
        return main_step(args)
    g = torch.Generator().manual_seed(0)
    for N, K in SHAPES:
        W, x = torch.randn(N, K, generator=g), torch.randn(1, K, generator=g)
        fns = kernels(W, args.threads)
        want = F.linear(x, W)
        for name, f in fns.items():  # every kernel computes the same product
            torch.testing.assert_close(f(x).reshape(want.shape), want, atol=1e-3, rtol=1e-4, msg=name)
        n = max(1, args.calls // 10) if N * K > 10_000_000 else args.calls
        cpu, wall = {k: [] for k in fns}, {k: [] for k in fns}
        for _ in range(args.rounds):
            for name, f in fns.items():
                f(x)
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(n):
                    f(x)
                cpu[name].append((time.process_time() - c0) / n)
                wall[name].append((time.perf_counter() - t0) / n)
        base = median(cpu["F.linear"])
        print(f"W {N}x{K} ({4 * N * K / 1e6:.1f} MB), {args.threads} threads:")
        for name in fns:
            c, w = median(cpu[name]), median(wall[name])
            print(f"  {name:14s} CPU {1e3 * c:8.3f} ms  wall {1e3 * w:8.3f} ms  {4 * N * K / w / 1e9:6.1f} GB/s  "
                  f"{base / c:5.2f}x F.linear (CPU)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
