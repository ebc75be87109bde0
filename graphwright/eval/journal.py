"""Resumable evaluation: every finished case is appended at once to a JSONL journal, and skipped on a rerun.

The long suite takes hours per method on a CPU and is accumulated over several sessions, so no
result may live only in memory. Each line of the journal is ``{"key": {...}, "row": {...}}``:
``key`` says exactly what was run (model, canonical recipe string, mode, task, length, case id,
case seed, a hash of the case's token ids and scoring target, graphwright's version and
``EVAL_VERSION``, and the generation settings), ``row`` is the per-case result the scorer reads.
A rerun with the same journal looks every case up by its key and runs only the missing ones; a
changed recipe string, case, seed or version is a different key, so no row is ever reused for
something it was not computed for. The table, intervals and plot are then rebuilt from whatever
the journal holds (``suite.summarise`` pairs each recipe with dense on the cases both have done
and says n per cell).

Appends are one ``write`` of a whole line followed by ``flush`` + ``fsync``; a process killed
mid-write can leave a torn last line, which ``Journal`` cuts off with a warning naming the file
(the case is then simply run again). Any other malformed line is an error.

Invariant tested (``tests/eval/test_journal.py``): a suite interrupted after k cases and resumed
gives exactly the result of one uninterrupted run; a changed recipe string does not reuse another
recipe's rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

# Bump when case generation, generation settings or scoring change in a way the key does not capture.
EVAL_VERSION = "eval-1"
KEY_FIELDS = ("model", "recipe", "mode", "task", "length", "case", "seed", "case_hash", "version", "settings")


def version_tag() -> str:
    """graphwright's package version and ``EVAL_VERSION``: part of every key."""
    from ..version import __version__

    return f"graphwright-{__version__}/{EVAL_VERSION}"


def case_hash(ids, target=None) -> str:
    """A short sha256 of a case's token ids (and its scoring target, e.g. the needle's activity)."""
    h = hashlib.sha256()
    h.update(",".join(str(int(i)) for i in ids).encode())
    if target is not None:
        h.update(b"|" + json.dumps(target, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def headsets_read(model: str, recipe: str) -> dict:
    """``{file name: short sha256}`` of the head-set files ``recipe`` reads on ``model``; ``{}`` when it reads none.

    A recipe string does not say which heads a shipped head set holds: ``duo(retrieval=0.375)`` means the top 37.5% of
    whatever file ships for the model. So the files' contents are part of the key, and a re-fitted shipped head set
    never reuses the rows the old one answered. Read: ``duo`` with ``retrieval`` unset or a fraction (the shipped set,
    ``duo`` preferred) or a file path; any pass with ``heads="scores"`` (``headset`` "shipped": the shipped set,
    ``retrieval`` preferred; "shipped:<method>": that method's set; or a file). Explicit head lists and "auto" read no file."""
    from ..heads.headset import is_shipped_spec, share_headset_file, shipped_file
    from ..recipes.recipe import Recipe

    if not recipe or recipe in ("dense", "identity"):
        return {}
    try:
        entries = Recipe.parse(recipe).to_list()
    except Exception:  # noqa: BLE001 - a label that is not a recipe reads no head set
        return {}

    paths = []
    for e in entries:
        if e["pass"] == "duo":  # as passes/duo_select.py resolves it
            r = e.get("retrieval")
            if r is None or (isinstance(r, (int, float)) and not isinstance(r, bool)):
                paths.append(shipped_file(model))
            elif isinstance(r, str) and r != "auto":
                paths.append(Path(r))
        if e.get("heads") == "scores":  # as passes/snapkv.py resolve_scores does
            h = e.get("headset", "shipped")
            try:
                paths.append(share_headset_file(model, h) if is_shipped_spec(h) else Path(str(h)))
            except ValueError:  # an unknown 'shipped:<method>': the recipe itself will refuse it
                pass
    return {p.name: _file_hash(p) for p in paths if p is not None and p.is_file()}


def make_key(model: str, recipe: str, mode: str, task: str, length: int, case: str, seed: int, case_hash: str,
             settings: dict | None = None) -> dict:
    """A journal key: everything that determines a case's result (with the head-set files the recipe reads:
    ``headsets_read``, under ``settings["headsets"]``)."""
    settings = dict(settings or {})
    if read := headsets_read(str(model), str(recipe)):
        settings["headsets"] = read
    return {"model": str(model), "recipe": str(recipe), "mode": str(mode), "task": str(task), "length": int(length),
            "case": str(case), "seed": int(seed), "case_hash": str(case_hash), "version": version_tag(),
            "settings": dict(sorted(settings.items()))}


def _norm(key: dict) -> str:
    missing = [f for f in KEY_FIELDS if f not in key]
    if missing:
        raise ValueError(f"a journal key needs the fields {list(KEY_FIELDS)}; missing {missing}")
    return json.dumps({f: key[f] for f in KEY_FIELDS}, sort_keys=True)


class Journal:
    """The JSONL file at ``path``: ``get(key)`` a finished row or None, ``add(key, row)`` appends it at once."""

    def __init__(self, path=None):
        self.path = None if path is None else Path(path)  # None: in memory only
        self._rows: dict = {}
        self._keys: dict = {}
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a run killed mid-write: drop the torn tail, its case runs again
            keep = data.rfind(b"\n") + 1
            warnings.warn(f"{self.path}: dropping a torn last line ({len(data) - keep} bytes, a run killed mid-write); "
                          "its case runs again", stacklevel=3)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        for i, ln in enumerate(data.decode("utf-8").split("\n")):
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
                k = _norm(rec["key"])
                row = rec["row"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{self.path} line {i + 1} is not a journal record {{'key': {{...}}, 'row': {{...}}}} "
                                 f"({type(exc).__name__}: {exc}); fix or remove that line") from None
            self._rows[k] = row
            self._keys[k] = rec["key"]

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: dict):
        return self._rows.get(_norm(key))

    def records(self):
        """``[(key, row)]`` for every finished case, in file order."""
        return [(self._keys[k], r) for k, r in self._rows.items()]

    def add(self, key: dict, row: dict) -> None:
        k = _norm(key)
        if k in self._rows:
            raise ValueError(f"{self.path} already holds a row for {k}; a case is run once per key")
        row = json.loads(json.dumps(row, default=str))  # what a reload gives back, so resumed == uninterrupted
        if self.path is not None:
            line = json.dumps({"key": json.loads(k), "row": row}, sort_keys=True) + "\n"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        self._rows[k] = row
        self._keys[k] = json.loads(k)
