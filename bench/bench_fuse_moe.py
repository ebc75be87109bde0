"""Benchmark fuse_moe on CPU: transformers' eager experts loop vs its grouped_mm experts vs graphwright.

Usage: python bench/bench_fuse_moe.py [--model smollm2-135m-moe] [--repeats 5] [--threads N]

Side by side in one process, alternating the variants inside every repeat (so machine load
hits all of them alike), medians reported, ratios relative to HF eager (>1 = faster):

* MoE layer alone (layer 0's sparse-moe block) at N = 512, 8, 1 tokens: HF block with
  ``_experts_implementation`` = "eager" / "grouped_mm"; graphwright = the torch backend of
  ``graphwright.fused_moe`` (what ``fuse_moe(impl=sorted)`` lowers to), routing included.
* Whole model: prefill of 512 tokens (logits of the last position only, for everyone) and
  greedy decode per token at batch 1 and 8 (32-token prompt, 16 steps). HF runs its own
  forward with a DynamicCache; graphwright runs its runtime (identity graph and fuse_moe).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import graphwright as gw
import graphwright.passes.fuse_moe  # noqa: F401  (registers fuse_moe until passes/__init__ imports it)
from graphwright.codegen.torch.moe import fused_moe_sorted


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(variants: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per variant; every repeat runs every variant once, in turn.

    A variant is ``fn`` or ``(setup, fn)``: ``setup`` (e.g. switching transformers' experts
    implementation) runs before each call and is not timed.
    """
    variants = {k: v if isinstance(v, tuple) else (lambda: None, v) for k, v in variants.items()}
    for _ in range(warmup):
        for setup, fn in variants.values():
            setup()
            fn()
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, (setup, fn) in variants.items():
            setup()
            times[k].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def set_experts(model, impl: str):
    model.config._experts_implementation = impl
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = impl


def hf_variant(model, impl, fn):
    """(untimed setup that selects transformers' experts implementation, timed call)."""
    return (lambda: set_experts(model, impl)), fn


@torch.inference_mode()
def bench_layer(model, n: int, repeats: int) -> dict:
    block = model.model.layers[0].mlp
    d = model.config.hidden_size
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(n)) * 4
    args = (block.gate.weight, None, block.experts.gate_up_proj, block.experts.down_proj, "mixtral",
            block.gate.top_k, model.config.hidden_act, 0.0, True)
    set_experts(model, "eager")
    want = block(x).view(n, d)
    got = fused_moe_sorted(x.view(n, d), *args)[0]
    tol = 1e-6 * float(want.abs().max())  # outputs reach ~1e4 here: compare relative to their scale
    assert torch.allclose(got, want, atol=tol, rtol=1e-5), (got - want).abs().max()
    set_experts(model, "grouped_mm")  # check that HF's grouped_mm path runs (and agrees) on CPU
    assert torch.allclose(block(x).view(n, d), want, atol=tol, rtol=1e-5)
    reps = repeats * (1 if n > 64 else 10)
    return alternate({
        "hf_eager": hf_variant(model, "eager", lambda: block(x)),
        "hf_grouped_mm": hf_variant(model, "grouped_mm", lambda: block(x)),
        "graphwright_fused": lambda: fused_moe_sorted(x.view(n, d), *args),
    }, reps)


@torch.inference_mode()
def hf_decode(model, ids, steps: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    t = time.perf_counter()
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(nxt, past_key_values=cache, use_cache=True)
    return (time.perf_counter() - t) / steps


def bench_model(model, cms: dict, prompt: int, batches, steps: int, repeats: int) -> dict:
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(100, vocab, (1, prompt), generator=g)
    res = {}

    def gw_prefill(cm):
        cm.generate(long_ids, max_new_tokens=1, eos_token_id=[])
        return cm.last_stats["prefill_s"]

    def hf_prefill(impl):
        set_experts(model, impl)
        with torch.inference_mode():
            return _timed(lambda: model(long_ids, use_cache=False, logits_to_keep=1))

    variants = {"hf_eager": lambda: hf_prefill("eager"), "hf_grouped_mm": lambda: hf_prefill("grouped_mm"),
                **{k: (lambda cm=cm: gw_prefill(cm)) for k, cm in cms.items()}}
    res[f"prefill_{prompt}"] = _alternate_values(variants, repeats)
    for B in batches:
        ids = torch.randint(100, vocab, (B, 32), generator=g)

        def gw_decode(cm, ids=ids):
            cm.generate(ids, max_new_tokens=steps + 1, eos_token_id=[])
            return cm.last_stats["decode_s"] / steps

        def hf_dec(impl, ids=ids):
            set_experts(model, impl)
            return hf_decode(model, ids, steps)

        variants = {"hf_eager": lambda: hf_dec("eager"), "hf_grouped_mm": lambda: hf_dec("grouped_mm"),
                    **{k: (lambda cm=cm: gw_decode(cm)) for k, cm in cms.items()}}
        res[f"decode_b{B}_per_token"] = _alternate_values(variants, repeats)
    return res


def _alternate_values(variants: dict, repeats: int) -> dict:
    """Like ``alternate`` but each variant reports its own measured seconds (prefill/decode split)."""
    for fn in variants.values():
        fn()
    vals = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            vals[k].append(fn())
    return {k: statistics.median(v) for k, v in vals.items()}


def table(results: dict) -> str:
    lines = []
    for case, row in results.items():
        base = row["hf_eager"]
        cells = "  ".join(f"{k} {v * 1e3:9.2f} ms ({base / v:4.2f}x)" for k, v in row.items())
        lines.append(f"{case:<22} {cells}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-moe")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--skip-model", action="store_true", help="only the MoE layer")
    p.add_argument("--out", default="results/bench_fuse_moe.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = gw.load_model(args.model)
    results = {f"layer_N{n}": bench_layer(model, n, args.repeats) for n in (512, 8, 1)}
    print(table(results), flush=True)
    if not args.skip_model:
        set_experts(model, "eager")
        cms = {"graphwright_identity": gw.compile(model, tokenizer=tok),
               "graphwright_fuse_moe": gw.compile(model, recipe="fuse_moe(impl=sorted)", tokenizer=tok)}
        model_res = bench_model(model, cms, args.prompt, (1, 8), args.steps, args.repeats)
        print(table(model_res))
        results.update(model_res)
    set_experts(model, "eager")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "torch_threads": torch.get_num_threads(),
                               "torch": torch.__version__, "seconds_median": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
