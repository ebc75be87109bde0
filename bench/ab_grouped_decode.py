"""A/B of the torch backend's decode attention: grouped query rows (``attention._grouped_decode``) against SDPA's
``enable_gqa`` (K/V read once per query head), dense SmolLM2, decode steps interleaved with HF's in one process.

Usage (session 17's 4,096-token figures, grouped 70.9 ms vs expand 78.6 ms per step, came from an ad hoc
version of this script with the same steppers; this committed script was smoke-run on tiny-llama only):

    python bench/ab_grouped_decode.py --prompt 4096 --steps 64

Both graphwright sides run the same compiled model; before each step the module's ``_grouped_decode`` is set to
that side's function, so the only difference is the attention call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402

import graphwright as gw  # noqa: E402
from graphwright.bench.timing import rotated  # noqa: E402
from graphwright.codegen.torch import attention as att  # noqa: E402


def expanded(q, k, v, scale, mask=None):
    """The previous call: SDPA with ``enable_gqa`` (and a mask repeated per query head)."""
    H, Hk = q.shape[1], k.shape[1]
    if mask is not None and mask.shape[1] != 1:
        mask = mask.repeat_interleave(H // Hk, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hk != H)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = gw.load_model(args.model)
    model.eval()
    ids = bd.prompt_ids(tok, args.prompt, model.config.vocab_size)
    cm = gw.compile(model, recipe=None, tokenizer=tok)
    grouped = att._grouped_decode
    sides = {"hf": bd.HFStepper(model), "grouped": bd.RuntimeStepper(cm), "expand": bd.RuntimeStepper(cm)}
    fns = {"hf": grouped, "grouped": grouped, "expand": expanded}
    times = {k: [] for k in sides}
    keys = list(sides)
    try:
        with torch.inference_mode():
            for k, s in sides.items():
                att._grouped_decode = fns[k]
                s.start(ids)
                s.step()
            for i in range(args.steps):
                for k in rotated(keys, i):
                    att._grouped_decode = fns[k]
                    t0 = time.perf_counter()
                    sides[k].step()
                    times[k].append(time.perf_counter() - t0)
    finally:
        att._grouped_decode = grouped
    for k in keys:
        speed = median(b / a for a, b in zip(times[k], times["expand"]))
        print(f"prompt {args.prompt} {k:8s} {1e3 * median(times[k]):6.1f} ms per step, speed vs expand {speed:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
