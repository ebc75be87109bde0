"""Emphasized token spans -> the steered graph's extra input (the per-position weights).

Spans are ``(start, end)`` token indices, end exclusive, into the *unpadded* prompt of a row (so
the same spans work whether or not the row is left-padded in a batch). One prompt takes a list
of spans; a batch takes one span list per row (``[]`` = no emphasis for that row).

How several spans combine follows the paper's code (``pastalib.PASTA.edit_multisection_attention``):

* ``exclude``: every span adds ``log(alpha)`` to every prompt position outside it, so a position
  gets ``log(alpha)`` times the number of spans that do *not* contain it;
* ``include``: every span adds ``log(alpha)`` on its own positions, then ``log(alpha)`` is
  subtracted once on all prompt positions: ``(count containing it - 1) * log(alpha)``.

With one span, include(1/alpha) == exclude(alpha). Generated positions always get 0. A row with
no spans gets all zeros (no bias at all, rather than pastalib's include-mode shift).
"""

from __future__ import annotations

import torch

from .bias import STEER_INPUT

MODES = ("exclude", "include")


def _is_span(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def normalize_emphasis(emphasis, batch: int) -> list:
    """One list of ``(start, end)`` tuples per row; accepts a span list for a single row."""
    if not isinstance(emphasis, (list, tuple)):
        raise ValueError(f"emphasis must be a list of (start, end) token spans (or one list per row); got {emphasis!r}")
    if len(emphasis) == 0 or all(_is_span(s) for s in emphasis):
        if batch != 1:
            raise ValueError(f"the batch has {batch} rows: give emphasis as one list of (start, end) spans per row")
        rows = [list(emphasis)]
    else:
        rows = list(emphasis)
        if len(rows) != batch:
            raise ValueError(f"emphasis has {len(rows)} span lists but the batch has {batch} rows")
    out = []
    for b, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not all(_is_span(s) for s in row):
            raise ValueError(f"emphasis for row {b} must be a list of (start, end) int spans; got {row!r}")
        out.append([tuple(int(v) for v in s) for s in row])
    return out


def check_spans(rows: list, lengths: list) -> None:
    """ValueError naming the span and the prompt length for any empty or out-of-prompt span."""
    for b, (row, n) in enumerate(zip(rows, lengths)):
        for s, e in row:
            if not (0 <= s < e <= n):
                where = f" of row {b}" if len(rows) > 1 else ""
                raise ValueError(f"emphasis span ({s}, {e}) is empty or outside the prompt{where}, which has {n} tokens; "
                                 f"spans are (start, end) token indices with 0 <= start < end <= {n}")


def emphasis_weights(rows: list, lengths: list, mode: str = "exclude", device=None) -> torch.Tensor:
    """[B, max(lengths)] float32: multiples of log(alpha) per row and prompt position."""
    if mode not in MODES:
        raise ValueError(f"steer mode must be one of {MODES}; got {mode!r}")
    check_spans(rows, lengths)
    P = max(lengths)
    w = torch.zeros(len(rows), P, dtype=torch.float32)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        if not row:
            continue
        inside = torch.zeros(P)
        for s, e in row:
            inside[s:e] += 1
        w[b, :n] = (len(row) - inside[:n]) if mode == "exclude" else (inside[:n] - 1)
    return w.to(device) if device is not None else w


def steer_extras(step_graph, emphasis, input_ids: torch.Tensor, attention_mask=None) -> dict:
    """The ``extras`` dict the runtime feeds a steered graph (``{}`` when ``emphasis`` is None)."""
    if emphasis is None:
        return {}
    spec = next((x for x in getattr(step_graph, "extra_inputs", []) if x.kind == "steer"), None)
    if spec is None:
        raise ValueError("emphasis needs a steered model: compile with a steer pass, "
                         "e.g. gw.compile(model, recipe=\"steer(heads='all')\")")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        lengths = [input_ids.shape[1]] * input_ids.shape[0]
    else:
        lengths = [int(n) for n in attention_mask.sum(dim=1)]
    rows = normalize_emphasis(emphasis, input_ids.shape[0])
    check_spans(rows, lengths)
    if not any(rows):  # nothing emphasized anywhere: feed nothing, the exact base path
        return {}
    return {spec.name: emphasis_weights(rows, lengths, spec.meta.get("mode", "exclude"), device=input_ids.device)}


__all__ = ["STEER_INPUT", "MODES", "normalize_emphasis", "check_spans", "emphasis_weights", "steer_extras"]
