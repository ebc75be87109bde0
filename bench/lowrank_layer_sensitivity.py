"""Which layers of a model tolerate low-rank K/V? One layer compressed at a time, perplexity delta.

Usage: python bench/lowrank_layer_sensitivity.py --fraction 0.25 --tokens 1024

Why this exists: LoRC's progressive schedule assumes shallow layers are the sensitive ones
(errors there propagate through every layer above), so it gives them more rank. On SmolLM2-135M
with activation-aware SVD the progressive schedule came out *worse* than uniform at every budget
(README, lowrank_kv table). This probe checks the assumption directly: for each layer l it keeps
every other layer at full rank (exact) and gives layer l only ``--fraction`` of its K/V width,
then measures perplexity on the shipped novel. A schedule is right when it gives more rank to
the layers whose row here shows the larger delta.

The per-layer ranks are set by replacing ``allocate_ranks`` for the duration of one compile
(the pass itself, its SVDs and its rewrite are unchanged).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import graphwright as gw
import graphwright.passes.lowrank_kv as lowrank_module
from graphwright.eval.perplexity import perplexity


@contextmanager
def one_layer_compressed(layer: int, fraction: float):
    original = lowrank_module.allocate_ranks

    def allocate(sig_k, sig_v, width_k, width_v, keep, schedule="progressive", min_keep=None, max_keep=None):
        plan = original(sig_k, sig_v, width_k, width_v, 1.0, "uniform")
        plan.r_k[layer] = max(1, round(fraction * plan.r_k[layer]))
        plan.r_v[layer] = max(1, round(fraction * plan.r_v[layer]))
        return plan

    lowrank_module.allocate_ranks = allocate
    try:
        yield
    finally:
        lowrank_module.allocate_ranks = original


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--fraction", type=float, default=0.25, help="K/V rank kept in the one compressed layer")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--out", default="results/lowrank_layer_sensitivity.json")
    args = p.parse_args(argv)

    model, tok = gw.load_model(args.model)
    kw = dict(max_tokens=args.tokens, window=args.window, stride=args.stride, progress=False)
    base = perplexity(gw.compile(model, tokenizer=tok), tok, **kw)["ppl"]
    progressive = gw.compile(model, recipe="lowrank_kv(keep=0.5)", tokenizer=tok).report().to_dict()["rows"]
    rows = []
    for layer in range(model.config.num_hidden_layers):
        t0 = time.perf_counter()
        with one_layer_compressed(layer, args.fraction):
            cm = gw.compile(model, recipe="lowrank_kv(keep=0.99, schedule='uniform')", tokenizer=tok, verify=False)
        ppl = perplexity(cm, tok, **kw)["ppl"]
        prog = next(r for r in progressive if r["layer"] == layer)
        rows.append({"layer": layer, "ppl": ppl, "delta": ppl - base,
                     "progressive_keep_at_0.5": round(prog["kv_bytes_per_token"] / prog["dense_kv_bytes_per_token"], 3)})
        print(f"layer {layer:2d}: ppl {ppl:8.2f} (+{ppl - base:7.2f})  progressive(0.5) gives it "
              f"{rows[-1]['progressive_keep_at_0.5']:.3f}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "fraction": args.fraction, "base_ppl": base, "rows": rows}, indent=2))
    print(f"base ppl {base:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
