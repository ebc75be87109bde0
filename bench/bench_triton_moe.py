"""GPU benchmark of the Triton fused-MoE kernels vs the HF MoE block and the torch fused path.

Usage (needs a CUDA GPU): python bench/bench_triton_moe.py [--model smollm2-135m-moe|synthetic] [--tokens 512 8 1]
    [--json out.json]

bf16, one process, ``triton.testing.do_bench`` medians, ratios relative to the HF block with
``_experts_implementation="eager"`` (>1 = faster), routing included for everyone:

* layer 0's sparse-MoE block of the model at each token count: HF eager loop, HF grouped_mm,
  graphwright torch fused (``fused_moe_sorted``), graphwright Triton (``fused_moe_triton``);
* a synthetic Mixtral-8x7B-shaped layer (d 4096, I 14336, 8 experts, top-2) with the same four
  rows except HF (torch fused vs Triton);
* at N = 1 (decode) the time against the memory-bandwidth floor: bytes of the active experts'
  weights (top_k experts x 3 x d x I x 2 bytes) / peak bandwidth (``--peak-gbps``, H100 SXM 3350).

Without a GPU it exits with a message; correctness is tested on CPU in tests/triton/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100) * 1e-3


def _set_experts(model, impl):
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = impl


def layer_rows(name, n, d, args, block=None, model=None, peak_gbps=3350.0):
    from graphwright.codegen.torch.moe import fused_moe_sorted
    from graphwright.codegen.triton.moe import fused_moe_triton

    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    want = fused_moe_sorted(x, *args)[0]
    got = fused_moe_triton(x, *args)[0]
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    variants = {}
    if block is not None:
        def hf(impl):
            def run():
                _set_experts(model, impl)
                return block(x[None])
            return run
        variants["hf eager"] = hf("eager")
        variants["hf grouped_mm"] = hf("grouped_mm")
    variants["graphwright torch fused"] = lambda: fused_moe_sorted(x, *args)
    variants["graphwright triton"] = lambda: fused_moe_triton(x, *args)
    times = {k: _bench(fn) for k, fn in variants.items()}
    base = next(iter(times.values()))
    rows = [{"layer": name, "tokens": n, "variant": k, "ms": round(t * 1e3, 4), "speedup": round(base / t, 3),
             "rel_err_vs_torch": err} for k, t in times.items()]
    if n == 1:
        _, _, gate_up, down, _, top_k = args[:6]
        floor = top_k * (gate_up[0].numel() + down[0].numel()) * 2 / (peak_gbps * 1e9)
        rows[-1]["bandwidth_floor_ms"] = round(floor * 1e3, 4)
        rows[-1]["fraction_of_peak_bw"] = round(floor / times["graphwright triton"], 3)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-moe",
                   help="a built-in MoE model, or 'synthetic': smollm2-135m-moe's shapes with random weights")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 8, 1])
    p.add_argument("--peak-gbps", type=float, default=3350.0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton_moe: no CUDA GPU here; the Triton MoE kernels are benchmarked on a GPU only "
                 "(CPU correctness: pytest tests/triton; CPU speed of the torch path: bench/bench_fuse_moe.py).")
    import graphwright as gw

    if a.model == "synthetic":  # smollm2-135m-moe's block shapes without its GGUF weights (a GPU machine has none)
        from transformers import LlamaConfig, LlamaForCausalLM

        from graphwright.models.upcycle import upcycle_to_mixtral

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_checks import SMOLLM2_135M

        torch.manual_seed(0)  # one decoder layer of SmolLM2-135M's shape; a small vocabulary (the block is what is timed)
        dense = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": 1, "vocab_size": 1024}))
        model = upcycle_to_mixtral(dense).to(torch.bfloat16)
    else:
        model, _ = gw.load_model(a.model, dtype=torch.bfloat16)
    model = model.cuda().eval()
    block = model.model.layers[0].mlp
    args = (block.gate.weight, None, block.experts.gate_up_proj, block.experts.down_proj, "mixtral",
            block.gate.top_k, model.config.hidden_act, 0.0, True)
    rows = []
    with torch.inference_mode():
        for n in a.tokens:
            rows += layer_rows(a.model, n, model.config.hidden_size, args, block, model, a.peak_gbps)
        E, d, inter = 8, 4096, 14336
        g = torch.Generator(device="cuda").manual_seed(0)
        mix = (torch.randn(E, d, device="cuda", generator=g, dtype=torch.bfloat16) / d ** 0.5, None,
               torch.randn(E, 2 * inter, d, device="cuda", generator=g, dtype=torch.bfloat16) / d ** 0.5,
               torch.randn(E, d, inter, device="cuda", generator=g, dtype=torch.bfloat16) / inter ** 0.5,
               "mixtral", 2, "silu", 0.0, True)
        for n in a.tokens:
            rows += layer_rows("mixtral-8x7b-shape", n, d, mix, peak_gbps=a.peak_gbps)
    print(f"GPU: {torch.cuda.get_device_name()}  bf16")
    for r in rows:
        bw = f"  floor {r['bandwidth_floor_ms']} ms ({r['fraction_of_peak_bw']} of peak BW)" if "bandwidth_floor_ms" in r else ""
        print(f"{r['layer']:<20} N={r['tokens']:<5} {r['variant']:<26} {r['ms']:>9.3f} ms  x{r['speedup']}{bw}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
