"""Torch-backend decode GEMV: split over the threads, or on weights stored [in, out]; flat weight attributes.

Decode multiplies one row per sequence by every weight matrix; at batch 1 the step reads all
weights once and little else, so its time is the GEMV's memory throughput. ATen's GEMV for a
single row (``F.linear``, ``x @ W^T``, ``torch.mv``) runs on one thread whatever
``torch.get_num_threads()`` says: on the 2-core box, idle, the SmolLM2-135M step's 211 weights
(538 MB) took 41-42 ms per pass at 1 and at 2 threads (``F.linear``), 34-35 ms through a
contiguous [in, out] copy, while ONNX Runtime's ``MatMul`` streams the same weights in 17 ms
with both threads (``bench/profile_onnx_decode.py``). So a decode-sized call (at most
``DECODE_ROWS`` rows):

* with ``P = split_parts(...) >= 2`` threads, splits ``W`` [out, in] into ``P`` blocks of output
  rows, a free view ``W.view(P, out/P, in)``, and runs one ``torch.bmm`` whose batches MKL runs in
  parallel: 23.2 ms per pass at 2 threads (1.47x the [in, out] copy), with no copy of the weights
  (an ad hoc session-15 measurement, not the committed ``bench/bench_decode_gemv.py``; the copy: 34.0 ms);
* on one thread, runs ``x @ w_t`` with ``w_t`` = ``w.t()`` stored contiguous (35 ms vs 41.5 ms
  for ``F.linear`` at 1 thread), made on the first such call and kept while ``w`` lives (one per
  weight tensor: tied weights and several compiled models of one HF model share it).

Session 16 caveat: in a fresh process at 2 threads ``F.linear`` used both cores (25.3 ms per pass; [in, out] copy
22.8, split 25.6, ``bench_decode_gemv.py --threads 2``); it stayed on one core after the process had run at 1 thread.
So the one-thread GEMV depends on process history; the split's sure gain is no weight copy at about the copy's speed.

Prefill (many rows) is a GEMM that ATen already parallelises: ``F.linear`` as written.
``prepack_decode_linears`` (part of the torch backend's ``finalize``) points every
``aten.linear`` whose weight is a 2-D CPU constant of the graph at ``linear_rows``.

Cost: none at >= 2 threads; at 1 thread the copies hold as many bytes as the model's linear
weights (for SmolLM2-135M ~540 MB, the tied LM head included). Set
``GRAPHWRIGHT_DECODE_WEIGHTS=shared`` before ``gw.compile`` to lower with plain ``F.linear``.

``flatten_constants`` retargets every ``get_attr`` of a dotted path (``hf.model.layers.0...``,
resolved through ``nn.Module.__getattr__`` at every call, ~270 per SmolLM2 step) to one plain
instance attribute holding the same tensor object (no copy).

Invariant tested (``tests/codegen/test_decode_linear.py``): ``linear_rows`` equals ``F.linear``
within fp32 rounding for 1, 2 and many rows, with and without bias, at 1 and 2 threads and for
out dims that do not split evenly; a lowered tiny model gives
the same logits as the unrewritten lowering (1e-5) over prefill and decode, batch 2 left-padded.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from ...passes.match import linear_parts

DECODE_ROWS = 2  # rows (batch x tokens) up to which the transposed copy is used


_TRANSPOSED: dict[int, tuple] = {}  # id(w) -> (weakref to w, w's version counter, w.t() contiguous)


def transposed(w: torch.Tensor) -> torch.Tensor:
    """``w.t()`` stored contiguous, made once per weight tensor (again after an in-place write to it) and dropped with it."""
    hit = _TRANSPOSED.get(id(w))
    version = getattr(w, "_version", 0)
    if hit is not None and hit[0]() is w and hit[1] == version:
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable when the step runs with grad on
        wt = w.detach().t().contiguous()
    if hit is None or hit[0]() is not w:
        weakref.finalize(w, _TRANSPOSED.pop, id(w), None)
    _TRANSPOSED[id(w)] = (weakref.ref(w), version, wt)
    return wt


MIN_PART_ROWS = 64  # output rows per thread below which a split is not worth its batch


def split_parts(out_features: int, threads: int) -> int:
    """Blocks of output rows for a decode GEMV: the most threads (<= ``threads``) that divide ``out_features``
    into blocks of at least ``MIN_PART_ROWS`` rows; 1 = no split."""
    for p in range(min(threads, out_features // MIN_PART_ROWS), 1, -1):
        if out_features % p == 0:
            return p
    return 1


def split_rows(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    """``x @ w.T`` for a few rows as one ``bmm`` over ``parts`` blocks of ``w``'s output rows ([..., out])."""
    n, k = w.shape
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    blocks = torch.bmm(rows.expand(parts, m, k), w.view(parts, n // parts, k).transpose(1, 2))  # [parts, m, n/parts]
    out = blocks.view(m, n) if m == 1 else blocks.transpose(0, 1).reshape(m, n)
    return out.view(*x.shape[:-1], n)


def decode_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for a decode-sized ``x``: split over the threads when ``w`` splits, else through the [in, out] copy."""
    p = split_parts(w.shape[0], torch.get_num_threads())
    return split_rows(x, w, p) if p > 1 else torch.matmul(x, transposed(w))


@torch.library.custom_op("graphwright::decode_gemv", mutates_args=())
def decode_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``decode_rows`` as an op of its own, so that Inductor (the ``compiled`` backend) calls it as it is instead
    of lowering it back to its single-threaded GEMV; the thread count is read when it runs (eager calls
    ``decode_rows`` directly: no dispatch overhead)."""
    return decode_rows(x, w)


@decode_gemv.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def linear_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``; ``decode_rows`` when x has <= DECODE_ROWS rows."""
    if x.numel() > DECODE_ROWS * x.shape[-1]:
        return F.linear(x, w, bias)
    out = decode_gemv(x, w) if torch.compiler.is_compiling() else decode_rows(x, w)
    return out if bias is None else out + bias


def _flat(target: str) -> str:
    return "_gw_" + target.replace(".", "_")


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def prepack_decode_linears(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Route each ``aten.linear`` with a constant 2-D CPU weight through ``linear_rows`` (see module doc)."""
    if os.environ.get("GRAPHWRIGHT_DECODE_WEIGHTS", "") == "shared":
        return gm
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x, w, bias = linear_parts(node)
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        weight = _attr(gm, w.target)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.device.type == "cpu":
            node.target, node.args, node.kwargs = linear_rows, (x, w, bias), {}
    gm.recompile()
    return gm


def flatten_constants(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Retarget dotted ``get_attr`` nodes to plain attributes holding the same tensors (no copy)."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        value = _attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        name = _flat(node.target)
        object.__setattr__(gm, name, value)  # an instance attribute: no nn.Module lookup per step
        node.target = name
    gm.recompile()
    return gm


def finalize_torch(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The torch backend's last lowering step: decode GEMV copies, then flat constant attributes."""
    return flatten_constants(prepack_decode_linears(gm))
