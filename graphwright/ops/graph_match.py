"""Low-level graph matchers shared by passes and codegen: each returns a match or ``NoMatch(reason)``.

Lives below ``passes`` and ``codegen`` (layering: capture -> ops -> passes -> codegen) so the one
cache-concatenation matcher serves the rewrite passes (``passes/match.py`` re-exports it) and the
lowering that turns a cache ``cat`` into an in-place append (``codegen/backends.py``).

A captured cache grows by ``cat([cache_state_input, new], dim)``; ``cache_concat`` recognises it
(positional or keyword ``dim``) and names its parts. Positional reads of aten ``cat`` arguments
happen here and nowhere else (``tests/test_schema_only.py``).

Invariant tested (``tests/passes/test_match.py``): every captured attention's keys and values
match ``cache_concat`` at dim 2 with a state placeholder first; a rewritten input gives a
``NoMatch`` whose reason names what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CAT = torch.ops.aten.cat.default


@dataclass(frozen=True)
class NoMatch:
    """A failed match and why; falsy, so ``if not m: return m.reason`` reads naturally."""

    reason: str

    def __bool__(self) -> bool:
        return False


def is_match(m) -> bool:
    return not isinstance(m, NoMatch)


def cat_parts(node) -> list:
    """The tensors an aten ``cat`` node concatenates."""
    return list(node.args[0]) if node.args else list(node.kwargs.get("tensors", ()))


def cat_dim(node) -> int:
    """The dimension of an aten ``cat`` node (positional, keyword or the default 0)."""
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def is_cat(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is _CAT


@dataclass(frozen=True)
class CacheConcat:
    """``cat = cat([cache, new], dim)``: a cache state input growing by this step's entries."""

    cat: torch.fx.Node
    cache: torch.fx.Node  # the state placeholder
    new: torch.fx.Node  # this step's entries
    dim: int


def cache_concat(node, dims=None) -> CacheConcat | NoMatch:
    """``cat([placeholder, new], dim)`` with ``dim`` in ``dims`` (an int, a tuple, or None for any)."""
    if not is_cat(node):
        return NoMatch(f"{getattr(node, 'name', node)} is not an aten cat")
    parts, dim = cat_parts(node), cat_dim(node)
    if len(parts) != 2:
        return NoMatch(f"{node.name} concatenates {len(parts)} tensors, not [cache, new]")
    if not (isinstance(parts[0], torch.fx.Node) and parts[0].op == "placeholder"):
        return NoMatch(f"{node.name}: its first part is not a cache state input")
    allowed = (dims,) if isinstance(dims, int) else dims
    if allowed is not None and dim not in allowed:
        return NoMatch(f"{node.name} concatenates along dim {dim}, not {allowed[0]}")
    return CacheConcat(node, parts[0], parts[1], dim)
