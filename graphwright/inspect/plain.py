"""Rich renderables as plain text (``str(report)``, ``str(diff)``): fixed width, no colour codes."""

from __future__ import annotations

import io

from rich.console import Console


def plain_text(renderable, width: int = 120) -> str:
    """What ``renderable`` prints, as uncoloured text with trailing spaces removed."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None, no_color=True,
                      force_terminal=False, force_jupyter=False, legacy_windows=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text(styles=False).splitlines()) + "\n"
