"""``ruff check graphwright`` is clean under the project's configuration (``[tool.ruff]`` in pyproject.toml).

ruff is in the ``test`` extra, so a missing ruff is a broken environment, not a reason to skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "graphwright", "--output-format", "concise"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ruff check graphwright failed (rc {r.returncode}):\n{r.stdout}{r.stderr}"
