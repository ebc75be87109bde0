"""The runtime's part of ``evict(..., rerotate=True)``: after the prompt step, later tokens continue at n, n+1, ...

The pass (``passes/evict_rerotate.py``) leaves each re-rotated layer's kept keys at positions 0..n-1 (per row).
Here the runtime reads n from those layers' per-head positions state (``key_positions<layer>``) and feeds the
next tokens there: generated tokens (``generate``), a question after a reusable context (``prefill`` records n
as the context's ``next_positions``) and teacher-forced tokens (``score_stream``, ``score_continuation``).
This is kvpress's pipeline after ``KeyRerotationPress``: the next position is the cache length.

A row whose heads or layers hold different counts has no single next position: ``ValueError`` naming them
(``evict`` refuses the rules that cause it up front; ChunkKV's per-head whole chunks can still differ).
Tested in ``tests/runtime/test_rerotate_positions.py`` and ``tests/passes/test_evict_rerotate.py``.
"""

from __future__ import annotations

import torch

POSITIONS = "key_positions"  # a layer's per-head positions state is POSITIONS + str(layer) (passes/eviction_common.py)


def next_positions(state, specs, layers) -> torch.Tensor:
    """[B, 1] long: the count n every head of every re-rotated layer keeps, per row (its next position)."""
    wanted = {f"{POSITIONS}{layer}" for layer in layers}
    counts = [(t >= 0).sum(dim=-1) for t, s in zip(state, specs) if s.kind == "positions" and s.name in wanted]
    if len(counts) != len(wanted):
        raise ValueError(f"rerotate: the state holds {len(counts)} of the {len(wanted)} re-rotated layers' positions")
    c = torch.cat(counts, dim=1)  # [B, layers * Hk]
    if not bool((c == c[:, :1]).all()):
        rows = [b for b in range(c.shape[0]) if not bool((c[b] == c[b, 0]).all())]
        raise ValueError(f"evict(..., rerotate=True): row(s) {rows} keep different token counts per head or layer "
                         f"(from {int(c[rows[0]].min())} to {int(c[rows[0]].max())}), so there is no single position to "
                         "continue from; use a rule that keeps the same count in every head (rule='fixed' without "
                         "per-head chunks) or leave rerotate out")
    return c[:, :1].clone()


def continued(rt, state, positions: torch.Tensor, prefix_len: int, layers=None, specs=None) -> torch.Tensor:
    """``positions`` [B, T] with columns ``prefix_len:`` moved to n, n+1, ... when ``rt`` re-rotates (else as is);
    ``rt`` None: the re-rotated ``layers`` and the state's ``specs`` are given (``stream_logits``)."""
    layers = getattr(rt, "rerotated_layers", None) if rt is not None else layers
    if not layers or prefix_len >= positions.shape[1]:
        return positions
    n = next_positions(state, rt.specs if rt is not None else specs, layers).to(positions.device)
    tail = n + torch.arange(positions.shape[1] - prefix_len, device=positions.device)
    return torch.cat([positions[:, :prefix_len], tail], dim=1)
