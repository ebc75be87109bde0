"""The one parser of layer / head selections in recipes (``layers=[...]``, ``heads={layer: [heads]}``).

Every pass that lets a recipe choose layers or heads (eviction passes' ``layers=``, ``window``'s
``layers=`` or ``heads=``, ``steer``'s head sets once its file / 'all' / 'auto' forms are read)
calls ``parse_layer_heads``, so a bad selection reads the same everywhere: a ``RecipeError``
starting with the pass name, saying what is wrong and naming the valid ranges
("valid layers are 0..L-1 (L layers), heads 0..H-1").

Invariant tested (``tests/passes/test_eviction_layers.py``, ``test_window.py``,
``tests/steer/test_steer_pass.py``): out-of-range, empty, repeated (where refused) and
non-integer selections raise ``RecipeError`` with those words.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import RecipeError


def _index(x, n: int) -> bool:
    return not isinstance(x, bool) and isinstance(x, int) and 0 <= x < n


def parse_layer_heads(pass_name: str, num_layers: int, num_heads: int | None = None, *, layers=None, heads=None,
                      repeats: bool = True, heads_form: str = "a {layer: [heads]} mapping") -> dict:
    """``{layer: None (the whole layer) | sorted heads}`` from ``layers=`` or ``heads=`` (neither: all layers).

    ``layers``: a list of layer indices (``repeats=False`` refuses one listed twice). ``heads``: a
    ``{layer: [heads] | head}`` mapping (keys may be strings of ints, as in JSON); a layer whose
    list names every head becomes None; a layer with an empty list selects nothing; the whole set
    must select at least one head. ``heads_form`` names the accepted forms in the error for a
    ``heads`` value that is not a mapping.
    """
    valid = f"valid layers are 0..{num_layers - 1} ({num_layers} layers)"
    if num_heads is not None:
        valid += f", heads 0..{num_heads - 1}"
    if layers is not None and heads is not None:
        raise RecipeError(f"{pass_name}: give either layers=[...] or heads={{layer: [heads]}}, not both")
    if heads is not None:
        if not isinstance(heads, Mapping):
            raise RecipeError(f"{pass_name}: heads must be {heads_form}; got {heads!r} ({valid})")
        return _heads(pass_name, heads, num_layers, num_heads, valid)
    if layers is None:
        return {layer: None for layer in range(num_layers)}
    return {layer: None for layer in _layers(pass_name, layers, num_layers, repeats, valid)}


def _heads(p: str, heads: Mapping, num_layers: int, num_heads: int | None, valid: str) -> dict:
    out: dict = {}
    for key, hs in heads.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise RecipeError(f"{p}: heads key {key!r} is not a layer index ({valid})") from None
        if not 0 <= layer < num_layers:
            raise RecipeError(f"{p}: layer {layer} is out of range ({valid})")
        hs = list(hs) if isinstance(hs, (list, tuple)) else [hs]
        for h in hs:
            if num_heads is None or not _index(h, num_heads):
                raise RecipeError(f"{p}: head {h!r} of layer {layer} is out of range ({valid})")
        if hs:
            out[layer] = sorted(set(out.get(layer) or []) | set(hs))
    if not out:
        raise RecipeError(f"{p}: the head set is empty; give at least one head ({valid})")
    return {layer: None if len(hs) == num_heads else hs for layer, hs in sorted(out.items())}


def _layers(p: str, layers, num_layers: int, repeats: bool, valid: str) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple, set, frozenset)):
        raise RecipeError(f"{p}: layers must be a list of layer indices; got {layers!r} ({valid})")
    layers = list(layers)
    if not layers:
        raise RecipeError(f"{p}: layers=[] selects nothing; leave it out for all layers ({valid})")
    bad = [x for x in layers if not _index(x, num_layers)]
    if bad:
        raise RecipeError(f"{p}: layers={layers} has {bad[0]!r} out of range; {valid}")
    if not repeats and len(set(layers)) != len(layers):
        raise RecipeError(f"{p}: layers={layers} repeats a layer; list each layer once")
    return sorted(set(layers))
