"""HF generate() vs graphwright's torch runtime vs graphwright's ONNX Runtime artifact, side by side.

Usage: python bench/bench_onnx.py --model smollm2-135m --prompt 256 --new 64 --repeats 3
       [--recipe identity --recipe "lowrank_kv(keep=0.6)"]   (default: identity and the demo recipe)

One process, CPU: the runs alternate (HF, then torch and ONNX per recipe, HF, ...) so machine
noise hits all alike; medians per side, ratios against HF and ONNX/torch decode. Every side
generates exactly ``--new`` greedy tokens. Each recipe is exported (and verified) first; export
times are reported apart. Writes the raw result as JSON.
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
from graphwright.cli.cmd_demo import DEMO_RECIPE

METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s", "kv_bytes")


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
    t.add_column("recipe")
    t.add_column("side")
    fmt = {"prefill_tokens_per_s": "{:,.1f}", "decode_tokens_per_s": "{:,.1f}", "kv_bytes": "{:,.0f}"}
    for k in fmt:
        t.add_column(k.replace("_tokens_per_s", " tok/s"), justify="right")
    for k in fmt:
        t.add_column(k.replace("_tokens_per_s", "").replace("_bytes", "") + " / HF", justify="right")
    t.add_column("ONNX / torch decode", justify="right")
    t.add_column("tokens", justify="right")
    med = result["median"]
    hf = med["hf"]
    t.add_row("(original)", "HF generate", *(f.format(hf[k]) for k, f in fmt.items()), *("1.00" for _ in fmt), "", "")
    for recipe in result["recipes"]:
        for side in ("torch", "onnx"):
            m = med[f"{recipe}/{side}"]
            ratio = m["decode_tokens_per_s"] / med[f"{recipe}/torch"]["decode_tokens_per_s"]
            same = result["same_tokens"][f"{recipe}/{side}"]
            t.add_row(recipe, "gw torch" if side == "torch" else "gw ONNX RT", *(f.format(m[k]) for k, f in fmt.items()),
                      *(f"{m[k] / hf[k]:.2f}" if hf[k] else "-" for k in fmt), f"{ratio:.2f}" if side == "onnx" else "",
                      ("= HF" if same else "!= HF") if side == "torch" else ("= torch" if same else "!= torch"))
    t.caption = "; ".join(f"{r}: export {result['export_s'][r]:.1f} s, verified max |dlogit| "
                          f"{result['onnx_verification'][r]['max_abs_logit_diff']:.2g}" for r in result["recipes"])
    console = Console(width=180, record=True, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(t)
    return cap.get()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", action="append", default=None,
                   help=f"recipe to compile (repeatable; default: identity and {DEMO_RECIPE!r}, the demo recipe)")
    p.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: ORT's default)")
    p.add_argument("--out", default="results/bench_onnx.json")
    args = p.parse_args(argv)
    recipes = args.recipe or ["identity", DEMO_RECIPE]

    model, tok = gw.load_model(args.model)
    model.eval()
    tmp = tempfile.TemporaryDirectory(prefix="gw-onnx-")
    compiled, runtimes, export_s, verification = {}, {}, {}, {}
    for i, recipe in enumerate(recipes):
        cm = gw.compile(model, recipe=None if recipe == "identity" else recipe, tokenizer=tok)
        onnx_dir = Path(tmp.name) / f"r{i}"
        t0 = time.perf_counter()
        gw.export_onnx(cm, onnx_dir)
        export_s[recipe] = time.perf_counter() - t0
        verification[recipe] = json.loads((onnx_dir / "graphwright.json").read_text())["verification"]
        compiled[recipe], runtimes[recipe] = cm, gw.load(onnx_dir, session_options=session_options(args.ort_threads))

    info = next(iter(compiled.values())).info
    vocab = info.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pad = info.pad_token_id if info.pad_token_id is not None else (info.eos_token_id or (0,))[0]
    sides = ["hf", *(f"{r}/{s}" for r in recipes for s in ("torch", "onnx"))]
    runs = {s: [] for s in sides}
    same = {s: True for s in sides[1:]}
    for i in range(args.warmup + args.repeats):
        ref, h = _hf(model, ids, mask, args.new, pad)
        rows = {"hf": h}
        for recipe in recipes:
            got_t, rows[f"{recipe}/torch"] = _gw(compiled[recipe], ids, mask, args.new)
            got_o, rows[f"{recipe}/onnx"] = _gw(runtimes[recipe], ids, mask, args.new)
            if i >= args.warmup:
                same[f"{recipe}/torch"] &= bool(torch.equal(ref, got_t))  # identity: must hold; lossy: informative
                same[f"{recipe}/onnx"] &= bool(torch.equal(got_t, got_o))  # ONNX vs its own torch runtime
        print(f"run {i}{' (warmup)' if i < args.warmup else ''}: decode tok/s " +
              ", ".join(f"{s} {r['decode_tokens_per_s']:.1f}" for s, r in rows.items()), flush=True)
        if i < args.warmup:
            continue
        for side, row in rows.items():
            runs[side].append(row)
    med = {s: {k: (median_low if "bytes" in k else median)(r[k] for r in runs[s]) for k in METRICS} for s in sides}
    result = {"model": args.model, "recipes": recipes, "torch_threads": torch.get_num_threads(),
              "ort_threads": args.ort_threads, "onnxruntime_providers": next(iter(runtimes.values())).providers,
              "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats, "warmup": args.warmup,
              "export_s": export_s, "onnx_verification": verification, "median": med,
              "ratios_vs_hf": {s: {k: med[s][k] / med["hf"][k] if med["hf"][k] else None for k in METRICS} for s in sides[1:]},
              "onnx_vs_torch_decode": {r: med[f"{r}/onnx"]["decode_tokens_per_s"] / med[f"{r}/torch"]["decode_tokens_per_s"]
                                       for r in recipes},
              "same_tokens": same, "runs": runs}
    print(_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    tmp.cleanup()


def session_options(threads: int):
    """ORT session options: full graph optimisation, sequential execution, ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = threads
    return so


if __name__ == "__main__":
    main()
