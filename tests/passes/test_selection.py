"""passes/selection.parse_layer_heads: the one parser of layers= / heads= selections."""

from __future__ import annotations

import pytest

from graphwright.errors import RecipeError
from graphwright.passes.selection import parse_layer_heads


def test_forms():
    assert parse_layer_heads("p", 3, 4) == {0: None, 1: None, 2: None}
    assert parse_layer_heads("p", 3, 4, layers=[2, 0, 2]) == {0: None, 2: None}
    assert parse_layer_heads("p", 3, 4, heads={"1": [3, 1, 3], 0: 2, 2: []}) == {0: [2], 1: [1, 3]}
    assert parse_layer_heads("p", 3, 4, heads={1: [0, 1, 2, 3]}) == {1: None}  # every head: the whole layer


@pytest.mark.parametrize("kwargs, needle", [
    ({"layers": [3]}, "p: layers=[3] has 3 out of range; valid layers are 0..2 (3 layers), heads 0..3"),
    ({"layers": [True]}, "has True out of range"),
    ({"layers": []}, "p: layers=[] selects nothing; leave it out for all layers"),
    ({"layers": [1, 1], "repeats": False}, "p: layers=[1, 1] repeats a layer"),
    ({"layers": "0"}, "p: layers must be a list of layer indices"),
    ({"heads": {0: [4]}}, "p: head 4 of layer 0 is out of range (valid layers are 0..2 (3 layers), heads 0..3)"),
    ({"heads": {5: [0]}}, "p: layer 5 is out of range"),
    ({"heads": {"x": [0]}}, "p: heads key 'x' is not a layer index"),
    ({"heads": {0: []}}, "p: the head set is empty"),
    ({"heads": [0]}, "p: heads must be a {layer: [heads]} mapping"),
    ({"layers": [0], "heads": {0: [1]}}, "p: give either layers=[...] or heads={layer: [heads]}, not both"),
])
def test_errors_name_what_is_wrong_and_the_valid_ranges(kwargs, needle):
    with pytest.raises(RecipeError) as err:
        parse_layer_heads("p", 3, 4, **kwargs)
    assert needle in str(err.value)
