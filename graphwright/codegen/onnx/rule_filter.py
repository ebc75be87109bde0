"""onnxscript's rewrite rules tried only on nodes of their root op type (exact; export time).

``onnxscript.rewriter.RewriteRuleSet`` tries every rule on every node: for each node of the graph, for
each rule, ``try_rewrite`` sets up a fresh ``MatchResult`` and asks the matcher, whose first check is
whether the node's op type equals the pattern's root (output) node's op type. On SmolLM2-135M
(identity, ~3,700 nodes, 44 rules, two rounds) that is ~280,000 attempts, almost all failing at that
first comparison, and they were ~60% of the optimizer's time (cProfile of ``optimize``: 17 of 29 s,
loaded machine). ``filtered(rules)`` returns shallow copies of the rules whose ``try_rewrite`` first
compares ``node.op_type`` with the root op type and returns None (what the matcher would return) when
they differ; otherwise the rule's own ``try_rewrite`` runs unchanged.

Exact by construction, and only applied where the argument holds: the rule is a plain
``RewriteRule`` (``try_rewrite`` and ``match`` not overridden), its matcher is the
``SimplePatternMatcher`` (which begins with ``_match_node(pattern.output_node, node)``), its pattern
has a single output node and that node's op is a ``StringConstantPattern`` (equality on the op
type). Any other rule (a pattern with several outputs, an op-type wildcard, another matcher) is kept
as it is. A node keeps its op type while the rules run on it, so the order of rewrites is unchanged.
``ENABLED = False``: the rules as onnxscript gives them (the A/B of ``bench/export_time.py --filter-ab``).
When onnxscript's internals named here are missing (another version), nothing is filtered.

Invariant tested (``tests/onnx/test_rule_filter.py``): the optimized ONNX model is byte-identical
with and without the filter (tiny Llama and tiny Qwen2 step graphs), a rule still fires through the
filter (``Cast(Cast(x))``), and the filtered rules skip nodes of another op type.
"""

from __future__ import annotations

import copy

ENABLED = True


def root_op_type(rule) -> str | None:
    """The op type every node a ``rule`` can match at its root has, or None when the filter does not apply."""
    try:
        from onnxscript.rewriter import _matcher, _pattern_ir, _rewrite_rule
    except ImportError:
        return None
    if type(rule) is not _rewrite_rule.RewriteRule:
        return None
    matcher = getattr(rule, "_matcher", None)
    pattern = getattr(rule, "_target_pattern", None)
    if type(matcher) is not _matcher.SimplePatternMatcher or pattern is None or not pattern.has_single_output_node:
        return None
    op = pattern.output_node.op
    if type(op) is not _pattern_ir.StringConstantPattern:
        return None
    return op.value()


def _guarded(rule, op_type: str):
    """A shallow copy of ``rule`` (same pattern, matcher and replacement) whose ``try_rewrite`` skips other op types."""
    r = copy.copy(rule)
    inner = r.try_rewrite  # bound to the copy

    def try_rewrite(model, graph_or_function, node, *, verbose=None, tracer=None):
        if node.op_type != op_type:
            return None
        return inner(model, graph_or_function, node, verbose=verbose, tracer=tracer)

    r.try_rewrite = try_rewrite
    return r


def filtered(rules: list) -> list:
    """``rules`` in the same order, each guarded by its root op type where ``root_op_type`` knows it."""
    if not ENABLED:
        return list(rules)
    out = []
    for rule in rules:
        op_type = root_op_type(rule)
        out.append(rule if op_type is None else _guarded(rule, op_type))
    return out
