"""Layers flow one way: no module of graphwright imports a layer above its own.

Every module is parsed with ``ast`` (imports inside functions count too) and each import of a
graphwright module is checked against ``LAYERS`` below: a module may import its own layer and
any layer listed before it, never one listed after. A failure names ``file:line``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "graphwright"

# Bottom to top. A name is a dotted module path under ``graphwright`` (``""`` = the package root);
# a module belongs to the layer of the longest name that prefixes it.
LAYERS = (
    ("errors", "version"),  # foundations: no graphwright imports at all
    ("models",),  # loading HF / GGUF / built-in tiny models, cache folders
    ("capture",),  # torch.export -> StepGraph; the graphwright custom ops' schema and references
    # ops: custom ops beyond capture's and their pure-torch references, GemFilter's selection maths;
    # steer.bias / steer.heads: the graph-side steering bias function and head-set files, which the
    # steer pass reads (the rest of graphwright.steer profiles and evaluates compiled models: app layer)
    # heads.headset(s): the per-KV-head retrieval score files duo reads (the profilers are app layer)
    ("ops", "steer.bias", "steer.heads", "heads.headset", "heads.headsets"),
    ("recipes",),  # recipe parsing: plain data naming passes
    ("passes",),  # graph rewrites (never lower or run a graph: verify_fn / ctx.lower come from above)
    ("codegen",),  # lowering to backends, ONNX translation and its step function
    ("runtime",),  # prefill/decode over step functions
    # application: compile/verify, the compiled and loaded models, reports, evaluation, steering tools
    ("compile", "compiled", "verify", "onnx_model", "inspect", "eval", "bench", "steer", "heads", "tuning"),
    ("cli", "__main__", ""),  # the command line and the package root (re-exports everything)
)

# (importing module, imported module) -> reason. Only genuinely lazy optional imports belong here.
ALLOWED: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of a dotted module name relative to the package (``""`` = root)."""
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".") or name == "") and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"graphwright.{module} is in no layer of LAYERS"
    return rank


def module_name(path: Path) -> tuple[str, str]:
    """(module, package) relative to graphwright, e.g. ("passes.base", "passes")."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def imported_modules(tree: ast.AST, package: str):
    """(line, module relative to graphwright) for every graphwright import, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and (node.module == "graphwright" or node.module.startswith("graphwright.")):
                target = node.module[len("graphwright."):] if node.module != "graphwright" else ""
            else:
                continue
            if node.module is None or target == "":  # `from . import x` / `from graphwright import x`
                for alias in node.names:
                    yield node.lineno, ".".join(p for p in (target, alias.name) if p) if _is_module(target, alias.name) else target
            else:
                yield node.lineno, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "graphwright" or alias.name.startswith("graphwright."):
                    yield node.lineno, alias.name[len("graphwright."):] if alias.name != "graphwright" else ""


def _is_module(package: str, name: str) -> bool:
    folder = PACKAGE.joinpath(*package.split(".")) if package else PACKAGE
    return (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, package = module_name(path)
        own = layer_of(module)
        for line, target in imported_modules(ast.parse(path.read_text(), str(path)), package):
            if layer_of(target) > own and (module, target) not in ALLOWED:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {_dotted(module)} ({'/'.join(LAYERS[own])}) "
                           f"imports {_dotted(target)} ({'/'.join(LAYERS[layer_of(target)])}), a layer above it")
    return bad


def _dotted(module: str) -> str:
    return f"graphwright.{module}" if module else "graphwright"


def test_no_module_imports_a_layer_above_its_own():
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_checker_sees_nested_and_relative_imports():
    tree = ast.parse("def f():\n    from ..codegen.lower import lower\n    from . import base\n    import graphwright.runtime\n")
    found = list(imported_modules(tree, "passes"))
    assert found == [(2, "codegen.lower"), (3, "passes.base"), (4, "runtime")]
    assert layer_of("passes.base") < layer_of("codegen.lower") < layer_of("runtime.generate") < layer_of("verify")
    assert layer_of("steer.bias") < layer_of("passes.steer") < layer_of("steer.profile")
    assert all(reason for reason in ALLOWED.values())
