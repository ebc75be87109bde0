"""No pass reads or writes a node's arguments by position, except aten-op helpers on an allow-list.

Attention nodes are read and written by name (``graphwright/ops/schema.py``): an index into an
attention node's ``args`` breaks silently when the op gains an argument. Every module under
``graphwright/passes/`` is parsed with ``ast``; a constant subscript or slice of ``.args``
(``n.args[1]``, ``n.args[:2]``) or ``update_arg(<int>, ...)`` fails with ``file:line`` unless the
enclosing function is in ``ALLOWED`` -- functions whose nodes are known aten ops, each with why.
Outside ``passes/`` the same forms are refused on a name that says it holds an attention node.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "graphwright"

# (file relative to graphwright/, function) -> why its positional reads are on aten ops only
ALLOWED: dict[tuple[str, str], str] = {
    ("passes/match.py", "source"): "first input of a unary aten op (view, cast, slice, getitem)",
    ("passes/match.py", "scalar_operand"): "the scalar operand of aten gt.Scalar / topk",
    ("passes/match.py", "linear_parts"): "aten.linear(x, weight, bias)",
    ("passes/match.py", "addmm_parts"): "aten.addmm(bias, x2d, weight)",
    ("passes/match.py", "key_norm"): "aten rsqrt / add / mean / mul of the key RMSNorm",
    ("passes/lowrank_rewrite.py", "_absorb_into_o"): "rewrites the o_proj aten linear/addmm and its reshapes",
    ("passes/lowrank_rewrite.py", "shrink_fused_qkv"): "aten slice users of a fused qkv linear; rewrites the linear",
    ("passes/lowrank_rewrite.py", "_shrink_c_attn"): "GPT-2's aten addmm -> view -> split -> getitem chain",
    ("passes/duo_latent.py", "_refold_o"): "rewrites the o_proj aten linear and its head-merging aten reshapes/views",
}
ATTENTION_NAMES = ("attn", "attention")


def _positional(node: ast.AST) -> bool:
    """``x.args[<int>]``, ``x.args[<int>:<int>]`` or ``x.update_arg(<int>, ...)``."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "args":
        s = node.slice
        if isinstance(s, ast.Constant) and isinstance(s.value, int):
            return True
        if isinstance(s, ast.Slice):
            return any(isinstance(b, ast.Constant) for b in (s.lower, s.upper))
        if isinstance(s, ast.UnaryOp) and isinstance(s.operand, ast.Constant):
            return True
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update_arg"
            and node.args and isinstance(node.args[0], ast.Constant)):
        return True
    return False


def _receiver(node: ast.AST) -> str:
    value = node.value.value if isinstance(node, ast.Subscript) else node.func.value
    return ast.unparse(value)


def _functions(tree: ast.AST):
    """(innermost enclosing function name or "<module>", node) for every node."""
    def walk(node, name):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            yield inner, child
            yield from walk(child, inner)
    yield from walk(tree, "<module>")


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "ops/schema.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        in_passes = rel.startswith("passes/")
        for func, node in _functions(tree):
            if not _positional(node):
                continue
            if in_passes:
                if (rel, func) in ALLOWED:
                    continue
            elif not any(a in _receiver(node).lower() for a in ATTENTION_NAMES):
                continue
            bad.append(f"graphwright/{rel}:{node.lineno} in {func}: {ast.unparse(node)[:80]}")
    return bad


def test_no_positional_argument_access_outside_the_schema():
    bad = violations()
    assert not bad, ("read arguments by name (ops/schema.py for attention ops, the helpers in passes/match.py and "
                     "ops/graph_match.py for aten ops):\n" + "\n".join(bad))


def test_the_scan_catches_each_form():
    code = "def f(attn, n):\n    a = attn.args[7]\n    b = n.args[:2]\n    n.update_arg(3, a)\n    c = n.args[-1]\n"
    found = [n for n in ast.walk(ast.parse(code)) if _positional(n)]
    assert [ast.unparse(n) for n in found] == ["attn.args[7]", "n.args[:2]", "n.update_arg(3, a)", "n.args[-1]"]
    ok = "def g(n, i):\n    x = n.args[i]\n    y = n.args\n"
    assert not [n for n in ast.walk(ast.parse(ok)) if _positional(n)]


def test_allow_list_names_existing_functions():
    for (rel, func), why in ALLOWED.items():
        src = (PACKAGE / rel).read_text()
        assert why and f"def {func}(" in src, (rel, func)
