"""HF generate() vs graphwright's torch runtime vs graphwright's ONNX Runtime artifact, side by side.

Usage: python bench/bench_onnx.py --model smollm2-135m --prompt 256 --new 64 --repeats 3

One process, CPU: the three runs alternate (HF, torch, ONNX, HF, ...) so machine noise hits all
alike; medians per side and ratios against HF. Every side generates exactly ``--new`` greedy
tokens. The ONNX side is exported (and verified) first; its export time is reported apart.
Writes the raw result as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from statistics import median, median_low

import torch

import graphwright as gw
from graphwright.bench.timing import hf_generate, hf_prefill

METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s", "kv_bytes")
SIDES = ("hf", "torch", "onnx")


def _hf(model, ids, mask, new, pad):
    prefill_s = hf_prefill(model, ids, mask)
    g = hf_generate(model, ids, mask, new, pad_token_id=pad)
    row = {"prefill_s": prefill_s, "prefill_tokens_per_s": int(mask.sum()) / prefill_s,
           **{k: g[k] for k in ("decode_s", "decode_tokens_per_s", "kv_bytes")}}
    return g["tokens"], row


def _gw(runner, ids, mask, new):
    out = runner.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    return out, {k: runner.last_stats[k] for k in METRICS}


def _table(result) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{result['model']} on CPU ({result['torch_threads']} torch threads): batch 1, prompt "
                    f"{result['prompt_tokens']}, {result['new_tokens']} new, median of {result['repeats']} alternating runs")
    t.add_column("metric")
    for side, head in (("hf", "HF"), ("torch", "gw torch"), ("onnx", "gw ONNX RT")):
        t.add_column(head, justify="right")
    t.add_column("torch/HF", justify="right")
    t.add_column("ONNX/HF", justify="right")
    fmt = {"prefill_tokens_per_s": "{:,.1f}", "decode_tokens_per_s": "{:,.1f}", "prefill_s": "{:.4f}",
           "decode_s": "{:.4f}", "kv_bytes": "{:,.0f}"}
    med = result["median"]
    for k, f in fmt.items():
        t.add_row(k, *(f.format(med[s][k]) for s in SIDES),
                  *(f"{med[s][k] / med['hf'][k]:.2f}" if med["hf"][k] else "-" for s in ("torch", "onnx")))
    t.caption = (f"same greedy tokens: torch {'yes' if result['same_tokens']['torch'] else 'NO'}, "
                 f"ONNX {'yes' if result['same_tokens']['onnx'] else 'NO'}; ONNX export {result['export_s']:.1f} s, "
                 f"verified max |dlogit| {result['onnx_verification']['max_abs_logit_diff']:.2g}")
    console = Console(width=140, record=True, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(t)
    return cap.get()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--onnx-dir", default=None, help="export here (default: a temporary folder)")
    p.add_argument("--out", default="results/bench_onnx.json")
    args = p.parse_args(argv)

    model, tok = gw.load_model(args.model)
    model.eval()
    cm = gw.compile(model, tokenizer=tok)
    tmp = None if args.onnx_dir else tempfile.TemporaryDirectory(prefix="gw-onnx-")
    onnx_dir = Path(args.onnx_dir or tmp.name)
    t0 = time.perf_counter()
    gw.export_onnx(cm, onnx_dir, overwrite=tmp is not None)
    export_s = time.perf_counter() - t0
    rt = gw.load(onnx_dir)

    vocab = cm.info.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pad = cm.info.pad_token_id if cm.info.pad_token_id is not None else (cm.info.eos_token_id or (0,))[0]
    runs = {s: [] for s in SIDES}
    same = {"torch": True, "onnx": True}
    for i in range(args.warmup + args.repeats):
        ref, h = _hf(model, ids, mask, args.new, pad)
        got_t, r_t = _gw(cm, ids, mask, args.new)
        got_o, r_o = _gw(rt, ids, mask, args.new)
        print(f"run {i}{' (warmup)' if i < args.warmup else ''}: decode tok/s HF {h['decode_tokens_per_s']:.1f} "
              f"torch {r_t['decode_tokens_per_s']:.1f} onnx {r_o['decode_tokens_per_s']:.1f}", flush=True)
        if i < args.warmup:
            continue
        for side, row in zip(SIDES, (h, r_t, r_o)):
            runs[side].append(row)
        same["torch"] &= bool(torch.equal(ref, got_t))
        same["onnx"] &= bool(torch.equal(ref, got_o))
    med = {s: {k: (median_low if "bytes" in k else median)(r[k] for r in runs[s]) for k in METRICS} for s in SIDES}
    meta = json.loads((onnx_dir / "graphwright.json").read_text())
    result = {"model": args.model, "recipe": "identity", "torch_threads": torch.get_num_threads(),
              "onnxruntime_providers": rt.providers, "prompt_tokens": args.prompt, "new_tokens": args.new,
              "repeats": args.repeats, "warmup": args.warmup, "export_s": export_s,
              "onnx_verification": meta["verification"], "median": med,
              "ratios_vs_hf": {s: {k: med[s][k] / med["hf"][k] if med["hf"][k] else None for k in METRICS}
                               for s in ("torch", "onnx")},
              "same_tokens": same, "runs": runs}
    print(_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
