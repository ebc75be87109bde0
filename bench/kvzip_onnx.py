"""KVzip in ONNX Runtime vs the torch runtime on SmolLM2-135M: the same compressed context, and the prefill cost.

Usage: python bench/kvzip_onnx.py [--tokens 512] [--budget 0.5] [--out /tmp/kvzip_onnx] [--repeats 2]
(reads bench/results/kvpress/cases.json, case L1024-c0: the context is its first --tokens tokens before the split,
the question the tokens after it). Compiles ``evict(score='kvzip', budget=B)``, exports it (reused when the folder
holds an export of the same recipe), then alternates ``prefill(context)`` on the torch runtime and on ONNX Runtime
(process CPU seconds, min of --repeats) and compares: kept positions per (layer, KV head) identical, max |K/V|
and |last logit| differences, the greedy answer to the question (24 new tokens) on both. Prints the machine's load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import graphwright as gw
from graphwright.bench.load import MachineLoad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--out", default="/tmp/kvzip_onnx")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    case = next(c for c in json.load(open("bench/results/kvpress/cases.json")) if c["id"] == "L1024-c0")
    ctx_ids = torch.tensor([case["ids"][:case["split"]][:a.tokens]])
    question = torch.tensor([case["ids"][case["split"]:]])
    recipe = f"evict(score='kvzip', budget={a.budget})"
    cm = gw.compile("smollm2-135m", recipe=recipe, verify=False)
    out = Path(a.out)
    meta = out / "graphwright.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("recipe") != str(cm.recipe):
        t = time.perf_counter()
        gw.export_onnx(cm, out, overwrite=True)
        print(f"export: {time.perf_counter() - t:.1f} s wall")
    rt = gw.load(out)
    times = {"torch": [], "onnx": []}
    ctx = {}
    with MachineLoad() as load:
        for _ in range(a.repeats):
            for name, m in (("torch", cm), ("onnx", rt)):
                t = time.process_time()
                ctx[name] = m.prefill(ctx_ids)
                times[name].append(time.process_time() - t)
    want, got = ctx["torch"], ctx["onnx"]
    specs = rt.state_specs
    pos_equal = all(torch.equal(w, g) for w, g, s in zip(want.state, got.state, specs) if s.kind == "positions")
    kv_diff = max(float((w.float() - g.float()).abs().max()) for w, g, s in zip(want.state, got.state, specs)
                  if s.kind == "kv")
    logit_diff = float((want.last_logits - got.last_logits).abs().max())
    gen = dict(max_new_tokens=24, eos_token_id=[])
    ans_t = cm.generate(question, context=want, **gen)[0, question.shape[1]:]
    ans_o = rt.generate(question, context=got, **gen)[0, question.shape[1]:]
    print(f"SmolLM2-135M, {recipe}, context {ctx_ids.shape[1]} tokens, machine {'BUSY (loaded)' if load.busy else 'quiet'}: "
          f"foreign share {load.foreign_share:.2f}, load before {load.load_before[0]:.2f}")
    print(f"prefill CPU s (min of {a.repeats}): torch {min(times['torch']):.2f}, onnx {min(times['onnx']):.2f} "
          f"(all: {times})")
    print(f"kept positions identical: {pos_equal}; kept fraction torch {cm.last_stats.get('kvzip', {})} ")
    print(f"max |K/V diff| {kv_diff:.2e}, max |last logit diff| {logit_diff:.2e}, kv_bytes torch {want.kv_bytes} "
          f"onnx {got.kv_bytes}")
    print(f"answer equal: {torch.equal(ans_t, ans_o)}; torch {rt.tokenizer.decode(ans_t) if rt.tokenizer else ans_t!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
