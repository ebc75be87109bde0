"""Decode steps of a dense ONNX artifact with the KV cache updated in place vs appended by Concat, alternating.

Usage: ``python bench/ab_inplace_kv.py ART/smollm2_135m_identity --prompt 2048 --blocks 6 --block 16 [--threads 2]``

Loads the artifact twice (``codegen/onnx/inplace_kv.ENABLED`` on, then off), runs one prompt step of
``--prompt`` tokens of the shipped novel on each, then alternates ``--blocks`` blocks of ``--block`` greedy
decode steps between the two, each continuing its own state (so the prompt is paid once per model, not per
round as in ``profile_onnx_decode.py --session-ab``). Prints per model the median wall ms and process CPU ms
per decode step over the blocks and the ratios, and checks that both produced the same tokens. CPU time is
the less load-sensitive column; on a shared machine every number is indicative.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

import torch

import graphwright as gw
from graphwright.codegen.onnx import inplace_kv


def load(folder: Path, threads: int, inplace: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False  # as bench_decode.py
    so.intra_op_num_threads = threads
    default, inplace_kv.ENABLED = inplace_kv.ENABLED, inplace
    try:
        m = gw.load(folder, session_options=so)
    finally:
        inplace_kv.ENABLED = default
    if (m.step.inplace is not None) != inplace:
        raise SystemExit(f"{folder}: in-place KV {'not available' if inplace else 'still on'} ({m.step.inplace_reason})")
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {"inplace": load(args.artifact, args.threads, True), "concat": load(args.artifact, args.threads, False)}
    text = (Path(gw.__file__).parent / "data" / "northangerabbey.txt").read_text(encoding="utf-8")
    tok = models["inplace"].tokenizer
    ids = tok(text[: 8 * args.prompt], return_tensors="pt", add_special_tokens=False).input_ids[:, :args.prompt]
    run = {}
    for name, m in models.items():
        step, specs = m.step, m.state_specs
        state = [s.empty(1, torch.device("cpu")) for s in specs]
        logits, state = step(ids, torch.arange(ids.shape[1])[None], torch.tensor([ids.shape[1] - 1]), state)
        run[name] = {"state": state, "logits": logits, "pos": ids.shape[1], "tokens": [], "wall": [], "cpu": []}
    zero = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(args.blocks):
            for name, m in models.items():
                r = run[name]
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.block):
                    nxt = r["logits"][:, -1].argmax(-1)
                    r["tokens"].append(int(nxt))
                    r["logits"], r["state"] = m.step(nxt[:, None], torch.tensor([[r["pos"]]]), zero, r["state"])
                    r["pos"] += 1
                r["wall"].append((time.perf_counter() - t0) / args.block * 1e3)
                r["cpu"].append((time.process_time() - c0) / args.block * 1e3)
    a, b = run["concat"], run["inplace"]
    print(f"{args.artifact.name}: prompt {args.prompt}, {args.blocks} alternating blocks of {args.block} decode steps, "
          f"{args.threads} threads; same tokens: {a['tokens'] == b['tokens']}")
    for name in ("concat", "inplace"):
        r = run[name]
        print(f"  {name:<8} wall {median(r['wall']):7.2f} ms/step (x{median(a['wall']) / median(r['wall']):.3f})  "
              f"CPU {median(r['cpu']):7.2f} ms/step (x{median(a['cpu']) / median(r['cpu']):.3f})  "
              f"blocks wall {[round(x, 1) for x in r['wall']]}")


if __name__ == "__main__":
    main()
