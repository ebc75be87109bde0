"""A head set: one retrieval score per (layer, KV head) and the default retrieval selection.

File format (JSON, parsed as data; written by :meth:`HeadSet.save`)::

    {"format": "graphwright.headset/1", "model": "smollm2-135m", "method": "retrieval" | "duo" | "mass",
     "num_layers": 30, "num_kv_heads": 3,
     "scores": [[s_00, s_01, s_02], ...],          # num_layers rows of num_kv_heads floats
     "retrieval": [[layer, kv_head], ...],          # the default retrieval heads
     "settings": {...}, "measured": {...}}          # how it was made; free-form data

Query heads of a GQA group share their KV head's entry (the profiler says how it pooled them).
``select(fraction)`` ranks by score (ties: lower layer, then lower head) and keeps the top
``round(fraction * L * Hk)`` heads, so a fraction of 0 is all streaming and 1 all retrieval.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "graphwright.headset/1"
METHODS = ("retrieval", "duo", "mass")
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_BYTES = 16 * 2**20
SHIPPED = Path(__file__).parent / "headsets"


@dataclass(frozen=True)
class HeadSet:
    """Scores [L][Hk] and the default retrieval selection of (layer, kv_head) pairs."""

    model: str
    method: str
    scores: tuple[tuple[float, ...], ...]
    retrieval: frozenset[tuple[int, int]]
    settings: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    def __post_init__(self):
        _check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        _check(0 < len(self.scores) <= MAX_LAYERS, f"scores must have 1..{MAX_LAYERS} layers, got {len(self.scores)}")
        width = len(self.scores[0])
        _check(0 < width <= MAX_HEADS, f"scores rows must have 1..{MAX_HEADS} KV heads, got {width}")
        for i, row in enumerate(self.scores):
            _check(len(row) == width, f"scores row {i} has {len(row)} entries; every row must have {width}")
            _check(all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in row),
                   f"scores row {i} must hold finite numbers")
        for pair in self.retrieval:
            _check(0 <= pair[0] < len(self.scores) and 0 <= pair[1] < width,
                   f"retrieval head {list(pair)} is outside {len(self.scores)} layers x {width} KV heads")

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    @property
    def num_kv_heads(self) -> int:
        return len(self.scores[0])

    def ranked(self) -> list[tuple[int, int]]:
        """(layer, kv_head) pairs by descending score; ties go to the lower layer, then head."""
        pairs = [(layer, head) for layer in range(self.num_layers) for head in range(self.num_kv_heads)]
        return sorted(pairs, key=lambda p: (-self.scores[p[0]][p[1]], p[0], p[1]))

    def select(self, fraction: float) -> frozenset[tuple[int, int]]:
        """The top ``round(fraction * L * Hk)`` heads by score."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"retrieval fraction must be a number in [0, 1], got {fraction!r}")
        count = round(fraction * self.num_layers * self.num_kv_heads)
        return frozenset(self.ranked()[:count])

    def check_model(self, num_layers: int, num_kv_heads: int, model: str | None = None) -> None:
        """A clear error when this head set was made for another shape of model."""
        if (self.num_layers, self.num_kv_heads) != (num_layers, num_kv_heads):
            raise ValueError(f"head set for {self.model!r} has {self.num_layers} layers x {self.num_kv_heads} KV heads; "
                             f"the model{f' {model!r}' if model else ''} has {num_layers} x {num_kv_heads}")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model, "method": self.method, "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads, "scores": [list(r) for r in self.scores],
                "retrieval": sorted([list(p) for p in self.retrieval]), "settings": self.settings, "measured": self.measured}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "head set") -> HeadSet:
        _check(isinstance(data, dict), f"{source}: must be a JSON object")
        _check(data.get("format") == FORMAT, f"{source}: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
        for key, kind in (("model", str), ("method", str), ("scores", list), ("retrieval", list)):
            _check(isinstance(data.get(key), kind), f"{source}: {key!r} must be a {kind.__name__}")
        _check(all(isinstance(r, list) for r in data["scores"]), f"{source}: 'scores' must be a list of lists")
        pairs = data["retrieval"]
        _check(all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
                   for p in pairs), f"{source}: 'retrieval' must be a list of [layer, kv_head] integer pairs")
        for key in ("settings", "measured"):
            _check(isinstance(data.get(key, {}), dict), f"{source}: {key!r} must be an object")
        try:
            return cls(model=data["model"], method=data["method"], scores=tuple(tuple(r) for r in data["scores"]),
                       retrieval=frozenset((p[0], p[1]) for p in pairs), settings=data.get("settings", {}),
                       measured=data.get("measured", {}))
        except (ValueError, IndexError) as err:
            raise ValueError(f"{source}: {err}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def headset_path(model: str, method: str = "duo") -> Path:
    """The shipped head set file for ``model`` and ``method``; a clear error lists what ships."""
    path = SHIPPED / f"{model}_{method}.json"
    if not path.is_file():
        have = sorted(p.stem for p in SHIPPED.glob("*.json"))
        raise FileNotFoundError(f"no shipped head set for model {model!r} and method {method!r}; shipped: {have or 'none'}. "
                                "Make one with `graphwright heads profile` and pass its path.")
    return path


def shipped_file(model: str, method: str | None = None) -> Path | None:
    """The file ``shipped_headset`` reads for ``model`` (``duo`` preferred over ``retrieval``), or None."""
    return next((p for p in (SHIPPED / f"{model}_{m}.json" for m in ([method] if method else ["duo", "retrieval"])) if p.is_file()), None)


def share_headset_file(model: str, spec: str) -> Path | None:
    """The shipped file a head-score-shares ``headset`` spelling names: ``'shipped'`` (the retrieval set, else the duo
    set) or ``'shipped:<method>'`` (that method's set, e.g. ``'shipped:mass'``); None when no such file ships. A
    ``ValueError`` names the methods for an unknown ``'shipped:...'``. Any other spelling is a path (not handled here)."""
    if spec == "shipped":
        return shipped_file(model, "retrieval") or shipped_file(model)
    method = spec.partition(":")[2]
    if method not in METHODS:
        raise ValueError(f"headset={spec!r}: 'shipped:<method>' takes a method of {METHODS}")
    return shipped_file(model, method)


def is_shipped_spec(spec) -> bool:
    """True for ``'shipped'`` and ``'shipped:<anything>'`` (the spellings :func:`share_headset_file` reads)."""
    return isinstance(spec, str) and (spec == "shipped" or spec.startswith("shipped:"))


def shipped_headset(model: str, method: str | None = None) -> HeadSet | None:
    """The shipped head set for ``model`` (``duo`` preferred over ``retrieval``), or None."""
    path = shipped_file(model, method)
    return load_headset(path) if path is not None else None


def load_headset(path: str | Path) -> HeadSet:
    """Read a head set file (JSON only, size-capped); every malformed field is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head set file {str(path)!r} not found")
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"head set file {path} is larger than {MAX_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"head set file {path} is not valid JSON: {err}") from None
    return HeadSet.from_dict(data, source=str(path))
