"""runtime/rerotate.py: after a re-rotated prompt step, later tokens continue at n (the kept count per row)."""

from __future__ import annotations

import pytest
import torch

from graphwright.capture.step_graph import StateSpec
from graphwright.runtime.rerotate import continued, next_positions


def layer_state(counts, S=6):
    """A per-head positions state [B, Hk, S]: row b, head h keeps counts[b][h] positions 0..n-1 (then -1)."""
    t = torch.full((len(counts), len(counts[0]), S), -1, dtype=torch.long)
    for b, row in enumerate(counts):
        for h, n in enumerate(row):
            t[b, h, :n] = torch.arange(n)
    return t


def specs(layers):
    kv = StateSpec("k_cache0", "kv", (-1, 2, 0, 4), torch.float32, seq_dim=2, layer=0)
    return [kv] + [StateSpec(f"key_positions{layer}", "positions", (-1, 2, 0), torch.long, seq_dim=2, layer=layer)
                   for layer in layers]


def test_next_position_is_the_kept_count_per_row():
    state = [torch.zeros(2, 2, 6, 4), layer_state([[4, 4], [2, 2]]), layer_state([[4, 4], [2, 2]])]
    assert next_positions(state, specs([0, 1]), (0, 1)).tolist() == [[4], [2]]


def test_different_counts_per_head_or_layer_are_refused_with_the_rows():
    heads = [torch.zeros(2, 2, 6, 4), layer_state([[4, 4], [2, 3]]), layer_state([[4, 4], [2, 3]])]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] keep different token counts.*from 2 to 3"):
        next_positions(heads, specs([0, 1]), (0, 1))
    layers = [torch.zeros(2, 2, 6, 4), layer_state([[4, 4], [2, 2]]), layer_state([[5, 5], [2, 2]])]
    with pytest.raises(ValueError, match=r"row\(s\) \[0\]"):
        next_positions(layers, specs([0, 1]), (0, 1))
    with pytest.raises(ValueError, match="holds 1 of the 2"):
        next_positions(layers[:2], specs([0]), (0, 1))


def test_continued_moves_the_tail_only_when_the_runtime_rerotates():
    class Rt:
        rerotated_layers = (0,)
        specs = specs([0])

    state = [torch.zeros(1, 2, 6, 4), layer_state([[3, 3]])]
    positions = torch.arange(9)[None]
    assert continued(Rt, state, positions, 5).tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 6]]
    Rt.rerotated_layers = None
    assert continued(Rt, state, positions, 5) is positions
