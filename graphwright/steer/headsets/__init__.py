"""Head sets profiled with ``graphwright steer profile`` that ship with graphwright.

``<model>_<task>.json`` files in this folder, in the format ``profile_heads`` writes (see
README, Attention steering): the demo and the examples steer with them, so a user sees PASTA
working without first spending the profiling time. Regenerate one with, e.g.::

    graphwright steer profile --model smollm2-135m --task json --examples 8 --max-new-tokens 32 \\
        --top-layers 2 --top-heads 4 --out graphwright/steer/headsets/smollm2-135m_json.json
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def headset_path(model: str, task: str) -> Path:
    """The shipped head set for ``model`` and ``task``; a clear error lists what ships."""
    path = HERE / f"{model}_{task}.json"
    if not path.is_file():
        have = sorted(p.stem for p in HERE.glob("*.json"))
        raise FileNotFoundError(f"no shipped head set for model {model!r} and task {task!r}; shipped: {have or 'none'}. "
                                "Make one with `graphwright steer profile` and pass heads='path.json'.")
    return path
