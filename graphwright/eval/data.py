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
