"""Decode steps of a dense ONNX artifact with the KV cache updated in place vs appended by Concat, alternating.

Usage: ``python bench/ab_inplace_kv.py ART/smollm2_135m_identity --prompt 2048 --blocks 6 --block 16 [--threads 2]``

``bench/ab_onnx_switch.py --switch inplace_kv`` (its docstring: the artifact loaded with
``codegen/onnx/inplace_kv.ENABLED`` off and on, one prompt step each, alternating blocks of decode steps, median
wall and CPU ms per step, the same tokens checked, the machine's load reported).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_onnx_switch import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--switch", "inplace_kv", *sys.argv[1:]]))
