"""The default evaluation text and reading text files with errors that say what to do.

The package ships one public-domain novel (Jane Austen, *Northanger Abbey*) so that
perplexity runs offline on a fixed text wherever graphwright is installed: a ΔPPL is only
meaningful when base and compiled models see the same tokens.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_TEXT = "northangerabbey.txt"


def default_text_path() -> Path:
    """Path of the shipped novel inside the installed package."""
    return Path(str(resources.files("graphwright") / "data" / DEFAULT_TEXT))


def read_text(path=None) -> str:
    """The text at ``path`` (UTF-8), or the shipped novel when ``path`` is None.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the fix, rather than a
    bare decode traceback from deep inside tokenisation.
    """
    p = default_text_path() if path is None else Path(path)
    if not p.is_file():
        hint = " (the package data is missing: reinstall graphwright)" if path is None else ""
        raise FileNotFoundError(f"text file not found: {p}{hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "give a plain-text file, e.g. convert it with `iconv -t utf-8`") from None
    if not text.strip():
        raise ValueError(f"{p} is empty: perplexity needs some text")
    return text


# The novel is split once, at a paragraph boundary: everything before is the calibration part
# (what any profiling or calibration that wants natural text may read), everything after is
# held out for the long-perplexity suite. Today no pass reads the novel at all: lowrank_kv's
# activation scaling and FastGen's profile read ``passes.pipeline.calibration_text`` (generated
# in code) and the steering profiler reads ``steer.tasks`` (generated in code);
# tests/eval/test_long_suite.py checks that neither shares text with the held-out part.
HELDOUT_FRACTION = 0.4


def split_point(text: str | None = None, fraction: float = HELDOUT_FRACTION) -> int:
    """Character index where the held-out part begins: the first paragraph break after ``1 - fraction``."""
    text = read_text() if text is None else text
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1); got {fraction}")
    at = int(len(text) * (1.0 - fraction))
    brk = text.find("\n\n", at)
    return len(text) if brk < 0 else brk + 2


def calibration_part(path=None) -> str:
    """The first ~60% of the text (the shipped novel by default): the only part calibration may read."""
    text = read_text(path)
    return text[:split_point(text)]


def heldout_part(path=None) -> str:
    """The last ~40% of the text (from a paragraph start): scored by the long-perplexity suite, read by no pass."""
    text = read_text(path)
    return text[split_point(text):]
