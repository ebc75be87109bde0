"""GemFilter with passes its selection graph cannot carry is refused at compile time (issue 19, item 14).

Invariant: ``gemfilter`` + ``window(heads=...)`` (a per-head split of the attention node the selection
reads) and ``gemfilter`` + ``steer`` (the selection runs without the steering input) raise a
``RecipeError`` naming both passes and the reason, in either written order, before any generation;
the message does not suggest disjoint layers (gemfilter has no layers argument).
"""

from __future__ import annotations

import pytest

import graphwright as gw
from graphwright import RecipeError

CASES = [
    ("gemfilter(layer=1, keep=8) + window(size=4, heads={0: [0]})", "gemfilter and window cannot share a layer"),
    ("window(size=4, heads={1: [1]}) + gemfilter(layer=1, keep=8)", "gemfilter and window cannot share a layer"),
    ("gemfilter(layer=1, keep=8) + steer(heads={0: [0]})", "gemfilter and steer cannot share a layer: the selection graph runs without"),
    ("steer(heads={1: [0, 1]}) + gemfilter(layer=0, keep=8)", "gemfilter and steer cannot share a layer"),
]


@pytest.mark.parametrize("recipe,match", CASES)
def test_refused_at_compile_time_with_the_reason(tiny, recipe, match):
    with pytest.raises(RecipeError, match=match) as e:
        gw.compile(tiny("tiny-llama"), recipe=recipe)
    assert "gemfilter acts on every layer, so they cannot be combined" in str(e.value)
    assert "disjoint" not in str(e.value)
