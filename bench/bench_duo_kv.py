"""KV bytes held by ``duo`` vs dense on smollm2-135m after a long prompt (function check, not quality).

Usage::

    PYTHONPATH=. python bench/bench_duo_kv.py --prompt-tokens 1024 --new-tokens 8 --fraction 0.5 [--headset FILE]

Without ``--headset`` (or the shipped ``smollm2-135m_duo.json``) a provisional head set is written to
a temporary folder: uniform random scores from a fixed seed (``--seed``), so the selection says
nothing about which heads retrieve; it only exercises the two caches. Prints one JSON line per
recipe with ``kv_bytes``, ``kv_bytes_dense`` and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

import graphwright as gw
from graphwright.heads import HeadSet, shipped_headset


def provisional(path: Path, seed: int, fraction: float) -> Path:
    rng = random.Random(seed)
    scores = tuple(tuple(rng.random() for _ in range(3)) for _ in range(30))
    hs = HeadSet(model="smollm2-135m", method="duo", scores=scores, retrieval=frozenset(),
                 settings={"provisional": f"uniform random scores, seed {seed}"})
    hs = HeadSet(model=hs.model, method=hs.method, scores=scores, retrieval=hs.select(fraction), settings=hs.settings)
    return hs.save(path, overwrite=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--fraction", type=float, default=0.5, help="retrieval fraction of the provisional head set")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--headset", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-dense", action="store_true", help="run duo only (kv_bytes_dense is still reported)")
    a = p.parse_args()
    model, tok = gw.load_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        if a.headset:
            heads = a.headset
        elif shipped_headset("smollm2-135m") is not None:
            heads = None
        else:
            heads = str(provisional(Path(tmp) / "smollm2-135m_duo.json", a.seed, a.fraction))
        retrieval = f"retrieval='{heads}', " if heads else ""
        ids = torch.randint(100, 40000, (1, a.prompt_tokens), generator=torch.Generator().manual_seed(a.seed))
        for recipe in ((None,) * (not a.skip_dense) + (f"duo({retrieval}sinks={a.sinks}, window={a.window})",)):
            cm = gw.compile(model, recipe=recipe, tokenizer=tok, verify=False)
            cm.generate(ids, max_new_tokens=a.new_tokens, eos_token_id=[])
            s = cm.last_stats
            print(json.dumps({"recipe": recipe or "dense", "prompt_tokens": a.prompt_tokens, "kv_bytes": s["kv_bytes"],
                              "kv_bytes_dense": s["kv_bytes_dense"], "kv_fraction": round(s["kv_fraction"], 4),
                              "duo": cm.step_graph.notes.get("duo", {}).get("counts")}))


if __name__ == "__main__":
    main()
