#!/usr/bin/env bash
# Create bench/.venv-kvpress: NVIDIA kvpress 0.5.5 in its own environment (benchmark-only; never a
# graphwright dependency). torch is pinned to the CPU wheel first, because an unpinned torch pulls CUDA.
# Usage: bash bench/setup_kvpress.sh [python]   (default python3; the venv is git-ignored)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-kvpress"
py="${1:-python3}"
"$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# a local CPU wheel (pip's find-links) first; else PyTorch's CPU index
"$venv/bin/pip" install --quiet "torch==2.13.0+cpu" 2>/dev/null \
  || "$venv/bin/pip" install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
"$venv/bin/pip" install --quiet "kvpress==0.5.5"
"$venv/bin/python" -c "import kvpress, torch, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'torch', torch.__version__, 'transformers', transformers.__version__)"
