"""Two shortcuts through ``torch.onnx.export`` for programs that do not need the work they skip.

``torch.onnx.export(exported_program, dynamo=True)`` runs, before translating to ONNX:

1. ``exported_program.run_decompositions(table)`` with the ATen decompositions of the ops the ONNX
   registry does not implement: a full retrace of the program under fake tensors and symbolic
   shapes (AOT autograd + functionalization). On SmolLM2-135M (30 layers) it was the largest phase
   of an export (cProfile, identity, measured under load: 130 s of a 320 s export; the
   ``torch.export`` before it 87 s). graphwright's step graphs are already functional ATen graphs
   (``torch.export`` output) of ops the registry translates directly, so the retrace returns the
   same graph. **Skip**: the program's operators are listed first; when none has an entry in the
   decomposition table, none is mutating and each is implemented by the registry (graphwright ops
   through their translation), the program goes on unchanged; otherwise the exporter's own step
   runs. ``aten.to.dtype(x, dtype)`` is first rewritten to ``aten._to_copy(x, dtype=dtype)`` and
   ``aten.__and__``/``__or__``/``__xor__`` to ``aten.bitwise_*``, which is what the retrace makes
   of them (the decode graph's slot eviction uses ``&`` and ``|`` on masks). Assertion nodes do not block: the exporter removes them next.
2. The type-promotion pass, an ``fx.Interpreter`` that re-runs every node on fake tensors to read
   its inputs' dtypes and inserts casts where an op's promotion rule asks for one (26 s of the
   same profile). **Reuse**: a node that the pass does not modify returns the fake value
   ``torch.export`` already stored in ``node.meta["val"]`` instead of being re-run; a node it
   modifies (and every cast it inserts) is still run by the pass itself, so its value is fresh.

``shortcuts(table)`` is a context manager around ``torch.onnx.export`` that installs both. When
the exporter internals they rely on are missing (another torch version), nothing is patched: the
export is slower, never different.

Invariant tested (``tests/onnx/test_exporter_shortcuts.py``): on a tiny model the ONNX graph
exported with the shortcuts has the same node sequence (op types) as the exporter's full path, the
skip is taken (recorded in ``graphwright.json``) and the artifact verifies; a program that needs a
decomposition (``hardshrink``) takes the full path and computes the right values.
"""

from __future__ import annotations

import contextlib

import torch

# What the last export under the patch did: {"skipped": bool, "blocking": [op names that forced a retrace]}
LAST: dict = {}


def _internals():
    """(``_fx_passes``, ``_decomp``, ``_TypePromotionInterpreter``) of the exporter, or Nones."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
        from torch.onnx._internal.fx.passes import type_promotion
    except ImportError:
        return None, None, None
    interp = getattr(type_promotion, "_TypePromotionInterpreter", None)
    if not hasattr(_fx_passes, "decompose_with_registry") or not hasattr(_decomp, "create_onnx_friendly_decomposition_table") \
            or interp is None or not hasattr(type_promotion, "get_type_promotion_rule") or not hasattr(interp, "_maybe_promote_node"):
        return None, None, None
    return _fx_passes, _decomp, interp


# Removed by the exporter right after the decomposition step (``_fx_passes.remove_assertion_nodes``).
ASSERTIONS = frozenset({torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
                        torch.ops.aten._assert_async.default, torch.ops.aten._assert_async.msg,
                        torch.ops.aten.sym_constrain_range_for_size.default})


# Python-operator aliases the retrace decomposes into the op they call (same schema, same result).
ALIASES = {torch.ops.aten.__and__.Tensor: torch.ops.aten.bitwise_and.Tensor,
           torch.ops.aten.__or__.Tensor: torch.ops.aten.bitwise_or.Tensor,
           torch.ops.aten.__xor__.Tensor: torch.ops.aten.bitwise_xor.Tensor}


def to_copy(ep: torch.export.ExportedProgram) -> int:
    """Rewrite in place what the retrace would rewrite anyway: ``aten.to.dtype(x, dtype)`` as
    ``aten._to_copy(x, dtype=dtype)``, and ``aten.__and__``/``__or__``/``__xor__`` (``&``, ``|``,
    ``^`` on tensors) as ``aten.bitwise_and``/``or``/``xor``; returns how many nodes changed. A
    ``to`` with a ``memory_format`` or ``copy``/``non_blocking`` flag stays (and blocks the skip)."""
    n = 0
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.to.dtype and len(node.args) == 2 and not node.kwargs:
            node.target, node.args, node.kwargs = torch.ops.aten._to_copy.default, (node.args[0],), {"dtype": node.args[1]}
            n += 1
        elif node.target in ALIASES:
            node.target = ALIASES[node.target]
            n += 1
    if n:
        ep.graph_module.recompile()
    return n


def blocking_ops(ep: torch.export.ExportedProgram, registered: set, table: dict, decomp_table: dict) -> list:
    """Names of the program's operators that the exporter's decomposition could change (empty: skip it)."""
    blocking = set()
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if target in ASSERTIONS:
                continue
            if isinstance(target, torch._ops.HigherOrderOperator):
                blocking.add(str(target))
            elif isinstance(target, torch._ops.OpOverload):
                mutates = target._schema.is_mutable
                if target in decomp_table or mutates or (target not in registered and target not in table):
                    blocking.add(str(target))
    return sorted(blocking)


def _run_node_reusing_meta(self, n):
    """``_TypePromotionInterpreter.run_node`` that reads an unmodified node's value from its meta."""
    from torch.onnx._internal.fx.passes.type_promotion import get_type_promotion_rule

    with self._set_current_node(n):
        if rule := get_type_promotion_rule(n, self.type_promotion_table):
            self._maybe_promote_node(n, rule)  # re-runs the node itself when it changes it
    if n.op == "call_function" and "val" in n.meta:
        return n.meta["val"]
    return torch.fx.Interpreter.run_node(self, n)


# opset -> the torchlib registry ``ONNXRegistry.from_torchlib`` built once in this process (``_registry_copy``)
_REGISTRIES: dict = {}


def _registry_copy(original):
    """``ONNXRegistry.from_torchlib`` that builds each opset's torchlib registry once per process and returns a
    copy (its own ``functions`` lists, so custom translations registered on the copy stay out of the cache)."""

    def from_torchlib(cls, opset_version=None):
        key = (cls, opset_version)
        if key not in _REGISTRIES:
            # torchlib's only op library that torch loads lazily (its 8 quantized_decomposed entries exist only
            # once this module is imported, torchvision aside): loaded first, the cached registry is the one the
            # exporter builds whatever the process imported before or after (tests/onnx/test_exporter_shortcuts.py)
            import torch.ao.quantization.fx._decomposed  # noqa: F401

            _REGISTRIES[key] = original(opset_version) if opset_version is not None else original()
        base = _REGISTRIES[key]
        registry = cls()
        registry._opset_version = base._opset_version
        registry.functions = {k: list(v) for k, v in base.functions.items()}
        return registry

    return classmethod(from_torchlib)


@contextlib.contextmanager
def shortcuts(table: dict):
    """While active, ``torch.onnx.export`` skips its decomposition retrace for clean programs, its
    type-promotion pass reuses stored fake values (module docstring) and its torchlib registry is built once
    per process (``_registry_copy``). ``LAST`` says what happened."""
    fx_passes, decomp, interp = _internals()
    LAST.clear()
    if fx_passes is None:
        LAST.update(skipped=False, blocking=["(exporter internals not found)"])
        yield
        return
    from torch.onnx._internal.exporter import _registration

    reg_cls = _registration.ONNXRegistry
    original_reg = reg_cls.__dict__.get("from_torchlib")
    if isinstance(original_reg, classmethod) and set(vars(reg_cls())) == {"_opset_version", "functions"}:
        reg_cls.from_torchlib = _registry_copy(original_reg.__get__(None, reg_cls))
    else:
        original_reg = None
    original, original_run = fx_passes.decompose_with_registry, interp.run_node

    def decompose(ep, registry):
        registered = set(decomp.get_onnx_implemented_overloads(registry))
        decomp_table = decomp.create_onnx_friendly_decomposition_table(registered)
        to_copy(ep)
        blocking = blocking_ops(ep, registered, table, decomp_table)
        LAST.update(skipped=not blocking, blocking=blocking)
        return ep if not blocking else original(ep, registry)

    fx_passes.decompose_with_registry, interp.run_node = decompose, _run_node_reusing_meta
    try:
        yield
    finally:
        fx_passes.decompose_with_registry, interp.run_node = original, original_run
        if original_reg is not None:
            reg_cls.from_torchlib = original_reg
