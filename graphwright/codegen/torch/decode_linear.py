"""Torch-backend decode GEMV on weights stored [in, out], and flat weight attributes in the lowered step.

Decode multiplies one row per sequence by every weight matrix; at batch 1 the step reads all
weights once and little else, so its time is the GEMV's memory throughput. ``F.linear(x, W)``
with HF's ``W`` [out, in] runs MKL's transposed-B path, which on the 2-core AMD EPYC box reached
about half the throughput of ``x @ W^T`` with ``W^T`` stored contiguous [in, out] (measured
under load, direction only: a 1536x576 weight x30 took 14.8 vs 9.3 ms at 2 threads; the
49152x576 LM head 23.3 vs 10.4 ms). Prefill (many rows) is a GEMM where the original layout is
as fast or faster, so both layouts are kept:

* ``prepack_decode_linears`` (part of the torch backend's ``finalize``) points every
  ``aten.linear`` whose weight is a 2-D CPU constant of the graph at ``linear_rows``;
* ``linear_rows(x, w, bias)`` runs ``F.linear(x, w, bias)`` for more than ``DECODE_ROWS`` rows
  (prefill), else ``x @ w_t`` with ``w_t`` = ``w.t()`` stored contiguous, made on the first
  decode-sized call and kept while ``w`` lives (one per weight tensor: tied weights and several
  compiled models of one HF model share it; lowerings that only prefill, like probes, make none).

Cost: the copies hold as many bytes as the model's linear weights (for SmolLM2-135M ~540 MB,
the tied LM head included), beside the weights the HF model keeps. Set
``GRAPHWRIGHT_DECODE_WEIGHTS=shared`` before ``gw.compile`` to lower without them.

``flatten_constants`` retargets every ``get_attr`` of a dotted path (``hf.model.layers.0...``,
resolved through ``nn.Module.__getattr__`` at every call, ~270 per SmolLM2 step) to one plain
instance attribute holding the same tensor object (no copy).

Invariant tested (``tests/codegen/test_decode_linear.py``): ``linear_rows`` equals ``F.linear``
within fp32 rounding for 1, 2 and many rows, with and without bias; a lowered tiny model gives
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


def linear_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``; through ``w``'s [in, out] copy when x has <= DECODE_ROWS rows."""
    if x.numel() > DECODE_ROWS * x.shape[-1] or torch.compiler.is_compiling():
        return F.linear(x, w, bias)
    out = torch.matmul(x, transposed(w))
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
