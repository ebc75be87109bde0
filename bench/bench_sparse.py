"""Sparse attention variants on a real model: NIAH accuracy, perplexity and attention time vs dense.

Usage: python bench/bench_sparse.py --length 2048 --depths 0.1 0.5 0.9 --ppl-tokens 1024 --ppl-decode 128

Every variant comes from one capture of the model (recipes applied to copies of the dense step
graph) and runs the same cases in one process, so the numbers sit side by side:

* NIAH: ``graphwright.eval.niah`` cases at ``--length`` prompt tokens (greedy, exact-match).
* Perplexity in stream mode: each window prefills ``window - ppl_decode`` tokens, then scores the
  last ``ppl_decode`` tokens through decode steps, where Quest / MoBA sparsity acts (their prefill
  is dense). GemFilter changes generation only, so it has no perplexity here.
* Attention time per decode step: the torch-backend attention op of every layer at the model's
  shapes with ``--length`` cached keys (median of ``--op-repeats`` calls; Quest / MoBA include
  their page-summary state update), summed over layers (dense layers stay dense), as a ratio to
  dense; plus the end-to-end decode tokens/s, prefill
  seconds and KV bytes of the last NIAH case.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import graphwright as gw
from graphwright.codegen.torch.attention import attention_sdpa
from graphwright.codegen.torch.block_sparse import block_sparse_sdpa
from graphwright.compiled import CompiledModel
from graphwright.eval.niah import encode, needle_grid, run_niah
from graphwright.eval.perplexity import perplexity
from graphwright.ops.block_sparse import num_pages, page_stats
from graphwright.ops.page_summary import page_summary_incremental
from graphwright.verify import run_recipe

VARIANTS = {
    "dense": None,
    "window": "window(size=256, sinks=4)",
    "quest": "block_sparse(block=64, top_k=8, mode='quest')",
    "moba": "block_sparse(block=64, top_k=8, mode='moba')",
    "quest16": "block_sparse(block=16, top_k=32, mode='quest')",  # Quest's own page size, same key budget
    "gemfilter": "gemfilter(keep=512)",
}


def op_time(fn, args, repeats: int) -> float:
    for _ in range(3):
        fn(*args)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def attention_step_seconds(info, length: int, repeats: int) -> dict:
    """Per-layer op time at decode with ``length`` cached keys, for each variant's attention call.

    Quest / MoBA run as the ``block_sparse`` pass lowers them: the page-summary update of the
    step (``page_summary_incremental``, once per kept statistic) plus the attention op reading
    those summaries; ``*_recompute`` rows time the op recomputing the statistics from every key
    instead (no page state), for comparison.
    """
    g = torch.Generator().manual_seed(0)
    H, Hk, D = info.num_heads, info.num_kv_heads, info.head_dim
    q = torch.randn(1, H, 1, D, generator=g, dtype=info.dtype)
    k = torch.randn(1, Hk, length, D, generator=g, dtype=info.dtype)
    v = torch.randn(1, Hk, length, D, generator=g, dtype=info.dtype)
    k_pos = torch.arange(length)[None]
    q_pos = k_pos[:, -1:]
    s = 1 / math.sqrt(D)
    def sparse(mode, block=64, top_k=8):
        names = ("min", "max") if mode == "quest" else ("mean",)
        stats = {n: page_stats(k, k_pos, block, num_pages(length, block), n) for n in names}

        def step():
            new = [page_summary_incremental(k, k_pos, q_pos, stats[n], block, n) for n in names]
            return block_sparse_sdpa(q, k, v, q_pos, k_pos, s, block, top_k, mode, False, *new)
        return step

    return {
        "dense": op_time(attention_sdpa, (q, k, v, q_pos, k_pos, s), repeats),
        "window": op_time(attention_sdpa, (q, k, v, q_pos, k_pos, s, 256, None, 4), repeats),
        "quest": op_time(sparse("quest"), (), repeats),
        "moba": op_time(sparse("moba"), (), repeats),
        "quest16": op_time(sparse("quest", 16, 32), (), repeats),
        "quest_recompute": op_time(block_sparse_sdpa, (q, k, v, q_pos, k_pos, s, 64, 8, "quest"), repeats),
        "moba_recompute": op_time(block_sparse_sdpa, (q, k, v, q_pos, k_pos, s, 64, 8, "moba"), repeats),
    }


def decode_only(base, tok, args) -> None:
    """End-to-end decode tokens/s after a ``--length``-token prompt, every variant in one process."""
    ids = torch.tensor([encode(tok, needle_grid(tok, lengths=(args.length,), depths=(0.5,))[0]["prompt"]).input_ids])
    rows = {}
    for name in args.variants:
        if name == "gemfilter":
            continue  # its decode runs over the kept tokens: not the same cache length
        cm = base if VARIANTS[name] is None else CompiledModel(run_recipe(base.step_graph, VARIANTS[name], verify=False)[0],
                                                                tokenizer=tok)
        cm.generate(ids, max_new_tokens=args.decode_only, eos_token_id=[])
        rows[name] = {"decode_tok_s": cm.last_stats["decode_tokens_per_s"], "prefill_s": cm.last_stats["prefill_s"],
                      "kv_summary_bytes": cm.last_stats["kv_summary_bytes"], "kv_bytes": cm.last_stats["kv_bytes"]}
        print(f"{name:10} decode {rows[name]['decode_tok_s']:6.2f} tok/s  prefill {rows[name]['prefill_s']:6.1f} s", flush=True)
    dense = rows.get("dense")
    for name, r in rows.items():
        r["decode_speed_ratio"] = r["decode_tok_s"] / dense["decode_tok_s"] if dense else None
        print(f"{name:10} decode x{r['decode_speed_ratio']:.2f} vs dense, page state {r['kv_summary_bytes'] / r['kv_bytes']:.4f} of KV bytes")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "length": args.length, "steps": args.decode_only,
                               "threads": args.threads, "rows": rows}, indent=2))
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=2048, help="NIAH prompt tokens and cached keys for the op timing")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--repeats", type=int, default=1, help="NIAH haystacks per depth")
    p.add_argument("--ppl-tokens", type=int, default=1024, help="perplexity window (one window)")
    p.add_argument("--ppl-decode", type=int, default=128, help="tokens scored through decode steps")
    p.add_argument("--op-repeats", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ops-only", action="store_true", help="only the attention-op timing (no NIAH / perplexity)")
    p.add_argument("--decode-only", type=int, default=0, metavar="STEPS",
                   help="only end-to-end decode: one --length-token prompt, STEPS greedy tokens per variant")
    p.add_argument("--out", default="results/bench_sparse.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = gw.load_model(args.model)
    if args.ops_only:  # shapes only: no capture
        c = model.config
        info = SimpleNamespace(num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                               head_dim=c.hidden_size // c.num_attention_heads, dtype=next(model.parameters()).dtype)
    else:
        base = gw.compile(model, tokenizer=tok)
        info = base.info
        cases = needle_grid(tok, lengths=(args.length,), depths=tuple(args.depths), repeats=args.repeats)
    if args.decode_only:
        return decode_only(base, tok, args)
    op = attention_step_seconds(info, args.length, args.op_repeats)
    L = info.num_layers
    if args.ops_only:
        step = {n: op[n] * (L - 2) + op["dense"] * 2 if n.startswith(("quest", "moba")) else op[n] * L for n in op}
        for n in op:
            print(f"{n:16} {op[n] * 1e3:7.3f} ms/layer  {step[n] * 1e3:7.2f} ms/step  x{step[n] / step['dense']:.2f} vs dense")
        return
    rows = []
    for name in args.variants:
        recipe = VARIANTS[name]
        if recipe is None:
            cm = base
        else:
            sg, _, _ = run_recipe(base.step_graph, recipe, verify=False)
            cm = CompiledModel(sg, tokenizer=tok)
        niah = run_niah(cm, tok, cases, max_new_tokens=12, progress=False)
        stats = dict(cm.last_stats)
        ppl = None
        if name != "gemfilter":
            ppl = perplexity(cm, tok, max_tokens=args.ppl_tokens, window=args.ppl_tokens, stride=args.ppl_decode,
                             mode="stream", prefix=args.ppl_tokens - args.ppl_decode, progress=False)["ppl"]
        dense_layers = 2 if name.startswith(("quest", "moba")) else 0
        attn = (op[name] * (L - dense_layers) + op["dense"] * dense_layers) if name in op else None
        rows.append({"variant": name, "recipe": recipe or "identity", "niah_accuracy": niah["accuracy"],
                     "answers": [c["answer"] for c in niah["cases"]], "ppl_stream": ppl,
                     "attn_s_per_step": attn, "decode_tok_s": stats.get("decode_tokens_per_s"),
                     "prefill_s": stats.get("prefill_s"), "kv_bytes": stats.get("kv_bytes"),
                     "kept_tokens": (stats.get("gemfilter") or {}).get("kept_tokens")})
        print(f"{name}: niah {niah['accuracy']:.2f} ppl {ppl} attn/step {attn} decode tok/s {stats.get('decode_tokens_per_s'):.1f}",
              flush=True)
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    if dense:
        for r in rows:
            r["ppl_ratio"] = r["ppl_stream"] / dense["ppl_stream"] if r["ppl_stream"] else None
            r["attn_ratio"] = r["attn_s_per_step"] / dense["attn_s_per_step"] if r["attn_s_per_step"] else None
            r["decode_speed_ratio"] = r["decode_tok_s"] / dense["decode_tok_s"] if r["decode_tok_s"] else None
            r["prefill_ratio"] = r["prefill_s"] / dense["prefill_s"] if r["prefill_s"] else None
            r["kv_ratio"] = r["kv_bytes"] / dense["kv_bytes"] if r["kv_bytes"] else None
    result = {"model": args.model, "length": args.length, "depths": args.depths, "ppl_tokens": args.ppl_tokens,
              "ppl_decode": args.ppl_decode, "threads": args.threads, "op_seconds_per_layer": op, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'variant':10} {'NIAH':>5} {'ppl':>7} {'ppl x':>6} {'attn ms/step':>12} {'attn x':>7} {'decode x':>8} {'KV x':>6}")
    for r in rows:
        f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        print(f"{r['variant']:10} {r['niah_accuracy']:5.2f} {f(r['ppl_stream'], '7.3f')} {f(r.get('ppl_ratio'), '6.3f')} "
              f"{f(None if r['attn_s_per_step'] is None else r['attn_s_per_step'] * 1e3, '12.2f')} {f(r.get('attn_ratio'), '7.3f')} "
              f"{f(r.get('decode_speed_ratio'), '8.3f')} {f(r.get('kv_ratio'), '6.3f')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
