"""The onnxscript optimizer as ``torch.onnx.export(optimize=True)`` runs it, minus one quadratic rule.

``torch.onnx.export(..., optimize=True)`` calls ``onnxscript.optimizer.optimize_ir`` (inline,
constant folding, the default rewrite rules, dead-node removal, constant lifting, CSE) and then
the opset-23 fusions (RMSNormalization, RotaryEmbedding, GQA). One default rule, ``SlicesSplit``
(two Slices of one tensor -> one Split), has a pattern with two output nodes; onnxscript's
matcher tries it by listing every node of the graph for each candidate Slice, so its cost grows
with the square of the graph size: on SmolLM2-135M (30 layers) it is about half of the whole
export (cProfile: ``_matcher.match`` 150 s of 340 s), while on a 2-layer test model it is
invisible. ONNX Runtime runs Slice and Split alike, so ``optimize`` runs the same pipeline
without that rule. When onnxscript's internals it relies on are missing (another version),
it falls back to the exporter's own ``ONNXProgram.optimize()``: slower, never wrong.

Each rule is tried only on nodes of its pattern's root op type (``rule_filter.py``: exact, the rule-by-node
attempts were ~60% of this step on SmolLM2-135M).

After the exporter's fusions, ``fuse_matmul.fuse_sibling_matmuls`` merges the MatMuls that share an
activation (q/k/v, gate/up) into one MatMul and a Split when ``FUSE_SIBLINGS`` is on (off by default; exact, see that module).
"""

from __future__ import annotations

# Rules skipped: multi-output patterns (quadratic in the node count with onnxscript's matcher).
SKIPPED_RULES = frozenset({"SlicesSplit"})
# fuse_matmul.py: q/k/v and gate/up MatMuls -> one MatMul + Split. Off by default: exact, but its decode gain is not
# established (idle machine, 4 alternating rounds: 1.03x tokens/s, within the rounds' ~5% spread; bench/fuse_artifact.py)
FUSE_SIBLINGS = False
STEPS = 2  # rounds of folding + rewrite rules (the exporter's own value); early stop when a round changes nothing


def default_rules():
    """onnxscript's default rewrite rules without ``SKIPPED_RULES``; None when not found."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        return None
    from .rule_filter import filtered  # rule_filter.py: each rule tried only on nodes of its root op type (exact)

    return filtered([r for r in rules if getattr(r, "name", None) not in SKIPPED_RULES])


def optimize(program) -> dict:
    """Optimize ``program`` (a ``torch.onnx.ONNXProgram``) in place; returns what ran."""
    try:
        import onnx_ir.passes.common as common
        from onnxscript import rewriter
        from onnxscript.optimizer import _constant_folding as folding
        from onnxscript.rewriter import onnx_fusions

        rules = default_rules()
    except ImportError:
        rules = None
    if not rules:
        program.optimize()
        return {"optimizer": "torch.onnx (fallback)", **_fuse_siblings(program.model)}
    import onnx_ir as ir

    model = program.model
    pipeline = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([folding.FoldConstantsPass(shape_inference=True,
                                                         input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                         output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                               rewriter.RewritePass(rules),
                               common.RemoveUnusedNodesPass(),
                               common.RemoveUnusedFunctionsPass(),
                               common.RemoveUnusedOpsetsPass()],
                              steps=STEPS, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    pipeline(model)
    fused = onnx_fusions.fuse(model)
    from . import rule_filter

    return {"optimizer": "onnxscript", "skipped_rules": sorted(SKIPPED_RULES), "rule_filter": rule_filter.ENABLED,
            "fusions": dict(fused), **_fuse_siblings(model)}


def _fuse_siblings(model) -> dict:
    """``{"sibling_matmuls": MatMuls removed}`` after ``fuse_matmul.fuse_sibling_matmuls`` (nothing when ``FUSE_SIBLINGS`` is off)."""
    if not FUSE_SIBLINGS:
        return {}
    from .fuse_matmul import fuse_sibling_matmuls

    return {"sibling_matmuls": fuse_sibling_matmuls(model)}
