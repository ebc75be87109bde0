"""Reading JSON files that came with a model folder or an artifact: size and nesting are bounded.

``json.loads`` recurses once per nesting level, so a 100,000-deep ``[[[...]]]`` raises
``RecursionError`` (and a 900-deep one parses, then makes every recursive walk of it fragile).
``read_json`` refuses a file over ``max_bytes`` before reading it, turns a ``RecursionError`` into
the caller's error class, and measures the nesting of what parsed with an explicit stack (no
recursion), refusing anything deeper than ``max_depth``. graphwright's own files nest at most 8
levels (``graphwright.json``: report rows inside the report); HF ``config.json`` files a few more.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GraphwrightError

MAX_DEPTH = 32
MAX_BYTES = 64 << 20


def nesting_depth(obj) -> int:
    """Depth of nested lists/dicts (a scalar is 0, ``[]`` is 1), computed without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in node if isinstance(x, (list, dict)))
    return depth


def read_json(path, what: str, error=GraphwrightError, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH):
    """Parse ``path`` as JSON; ``error(message)`` (naming ``what``) on a missing, huge, corrupt or too-deep file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({type(exc).__name__}: {exc.strerror or exc})") from None
    if size > max_bytes:
        raise error(f"{path}: {what} is {size} bytes; at most {max_bytes} are read")
    try:
        obj = json.loads(path.read_bytes())
    except RecursionError:
        raise error(f"{path}: {what} nests too deeply to parse (at most {max_depth} levels are allowed)") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{path}: corrupt {what} ({str(exc).splitlines()[0][:200]}); expected a JSON file") from None
    depth = nesting_depth(obj)
    if depth > max_depth:
        raise error(f"{path}: {what} nests {depth} levels deep; at most {max_depth} are allowed")
    return obj
