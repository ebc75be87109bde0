"""GPU checks of graphwright on a CUDA machine: whole models on the GPU, and decode speed side by side.

Usage (needs a CUDA GPU; ``bench/gpu_checks.sh`` runs every section, each in its own process):

    python bench/gpu_checks.py tiny     [--out DIR]   # whole tiny models: backend triton == torch, GPU == CPU
    python bench/gpu_checks.py decode   [--out DIR] [--prompts 2048 8064] [--new 128] [--dtype bfloat16]
    python bench/gpu_checks.py compiled [--out DIR] [--prompts 2048] [--new 128]

Sections:

* ``tiny``: the tiny test models moved to CUDA (fp32). For each recipe of the CPU backend test
  (``tests/triton/test_triton_backend.py``: steering with emphasis, h2o, lowrank_kv absorbed and
  reconstruct, block_sparse) and for tiny-mixtral with ``fuse_moe``: greedy tokens of
  ``backend="triton"`` on the GPU equal ``backend="torch"`` on the GPU, and the GPU torch backend's
  tokens equal the CPU torch backend's. A mismatch is a failed check, written with both token rows.
* ``decode``: a SmolLM2-135M-shaped model (its config: 30 layers, 9 query / 3 KV heads of 64, d 576,
  SwiGLU 1536, vocab 49152; random weights, since the GGUF weights do not travel to the GPU machine:
  speed does not depend on weight values) on the GPU: HF ``generate()``, graphwright torch and
  triton backends (identity), and the eviction recipes at 25% KV on the torch backend, sides
  alternating per repeat, medians; decode tokens/s, ratios to HF and to dense graphwright.
* ``compiled``: the same model, ``backend="compiled"`` (torch.compile; CUDA graphs on CUDA) for
  identity and streaming at 25% KV, against HF and the torch backend in the same process.

Every row is appended to ``DIR/gpu_checks.jsonl`` as it is measured (a section cut short by its
time limit keeps what it finished); failures are rows with the exception text, not crashes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import GWSide, HFSide, recipe_text  # noqa: E402 - the CPU speed table's sides and recipes

from graphwright.bench.timing import rotated  # noqa: E402

OUT = Path(".")
DEVICE = "cuda"  # --device cpu: a smoke run of the code paths on CPU (TRITON_INTERPRET=1 for triton)

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2)

EVICTION = ("h2o25", "streaming25", "snapkv25")  # bench/bench_decode.py's recipes at 25% of the prompt


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def emit(row: dict) -> None:
    row = {"time": time.strftime("%H:%M:%S"), **row}
    with open(OUT / "gpu_checks.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def guarded(section: str, name: str, fn):
    """Run one check; a failure becomes a row with its exception (the next check still runs)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported as a row, with its traceback
        emit({"section": section, "check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:600],
              "traceback": traceback.format_exc()[-2500:]})
        return None


# ---------------------------------------------------------------- tiny models: triton == torch, GPU == CPU

TINY_RECIPES = [
    ("tiny-llama", "steer(alpha=0.05, heads='all')", [(1, 5)]),
    ("tiny-llama", "h2o(heavy=4, recent=4)", None),
    ("tiny-llama", "lowrank_kv(keep=0.5)", None),
    ("tiny-llama", "lowrank_kv(keep=0.5, value_path='reconstruct')", None),
    ("tiny-llama", "block_sparse(block=4, top_k=2, dense_layers=[])", None),
    ("tiny-llama", None, None),
    ("tiny-mixtral", "fuse_moe", None),
]


def tiny_section(args) -> None:
    import graphwright as gw
    from tests.conftest import left_padded_batch  # the CPU tests' batch (run from the repository root)

    for name, recipe, emphasis in TINY_RECIPES:
        def check(name=name, recipe=recipe, emphasis=emphasis):
            cpu_model, _ = gw.load_model(name)
            gpu_model, _ = gw.load_model(name)
            gpu_model = gpu_model.to(DEVICE)
            cpu = gw.compile(cpu_model, recipe=recipe, verify=False)
            ref = gw.compile(gpu_model, recipe=recipe, verify=False)
            tri = gw.compile(gpu_model, recipe=recipe, verify=False, backend="triton")
            ids, mask = left_padded_batch(cpu.info.vocab_size, [11, 7], seed=3)
            rows = None if emphasis is None else [emphasis, emphasis]
            kw = dict(max_new_tokens=6, attention_mask=mask, emphasis=rows) if rows else \
                dict(max_new_tokens=6, attention_mask=mask)
            want_cpu = cpu.generate(ids, **kw)
            kw_gpu = dict(kw, attention_mask=mask.to(DEVICE))
            want = ref.generate(ids.to(DEVICE), **kw_gpu)
            got = tri.generate(ids.to(DEVICE), **kw_gpu)
            kernels = sorted({getattr(n.target, "__name__", str(n.target)) for n in tri._lowered.graph.nodes
                              if n.op == "call_function" and "triton" in getattr(n.target, "__module__", "")})
            ok = bool(torch.equal(got.cpu(), want.cpu())) and bool(torch.equal(want.cpu(), want_cpu))
            emit({"section": "tiny", "check": f"{name} {recipe or 'identity'}", "ok": ok,
                  "triton_eq_torch_gpu": bool(torch.equal(got.cpu(), want.cpu())),
                  "gpu_eq_cpu": bool(torch.equal(want.cpu(), want_cpu)), "triton_kernels": kernels,
                  **({} if ok else {"cpu": want_cpu.tolist(), "gpu": want.tolist(), "triton": got.tolist()})})
        guarded("tiny", f"{name} {recipe or 'identity'}", check)


# ---------------------------------------------------------------- decode speed on a SmolLM2-135M-shaped model

def smollm2_shaped(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    return model.to(device=DEVICE, dtype=dtype).eval()


class Synced:
    """A side of ``bench/bench_decode.py`` (its HF and graphwright sides, their own timers) with the GPU's queue
    drained before and after each generation, so no side's kernels run inside another side's timing."""

    def __init__(self, side):
        self.side = side

    def run(self, ids, new):
        sync()
        out = self.side.run(ids, new)
        sync()
        return out


def measure(section: str, sides: dict, ids, new: int, repeats: int, warmup: int, extra: dict) -> None:
    keys = list(sides)
    runs = {k: [] for k in keys}
    tokens = {}
    for r in range(warmup + repeats):
        for k in rotated(keys, r):
            try:
                out, row = sides[k].run(ids, new)
            except Exception as e:  # noqa: BLE001 - a side that fails is reported and dropped
                emit({"section": section, "check": k, "ok": False, "error": f"{type(e).__name__}: {e}"[:600],
                      "traceback": traceback.format_exc()[-2000:], **extra})
                sides.pop(k)
                keys.remove(k)
                continue
            tokens[k] = out.cpu()
            if r >= warmup:
                runs[k].append(row)
    hf = median(r["decode_tokens_per_s"] for r in runs["hf"]) if runs.get("hf") else None
    dense = {}
    for k in keys:
        if runs[k] and k.startswith("identity/"):
            dense[k.split("/")[1]] = median(r["decode_tokens_per_s"] for r in runs[k])
    for k in keys:
        if not runs[k]:
            continue
        dec = median(r["decode_tokens_per_s"] for r in runs[k])
        rt = k.split("/")[-1]
        emit({"section": section, "check": k, "ok": True, **extra,
              "decode_tokens_per_s": round(dec, 1),
              "prefill_tokens_per_s": round(median(r["prefill_tokens_per_s"] for r in runs[k]), 1),
              "decode_vs_hf": round(dec / hf, 3) if hf else None,
              "decode_vs_dense_same_runtime": round(dec / dense[rt], 3) if rt in dense else None,
              "kv_bytes": runs[k][-1]["kv_bytes"], "rounds": [round(r["decode_tokens_per_s"], 1) for r in runs[k]],
              "tokens_equal_hf": bool(torch.equal(tokens[k], tokens["hf"])) if "hf" in tokens else None})


def decode_section(args) -> None:
    import graphwright as gw

    dtype = getattr(torch, args.dtype)
    model = smollm2_shaped(dtype)
    emit({"section": "decode", "check": "model", "ok": True, "dtype": args.dtype,
          "params": sum(p.numel() for p in model.parameters()), "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"})
    for P in args.prompts:
        def one(P=P):
            sides = {"hf": Synced(HFSide(model, SMOLLM2_135M["pad_token_id"]))}
            for rt in args.backends:
                sides[f"identity/{rt}"] = Synced(GWSide(gw.compile(model, backend=rt, verify=False)))
            for name in args.recipes:
                sides[f"{name}/torch"] = Synced(GWSide(gw.compile(model, recipe=recipe_text(name, P), verify=False)))
            ids = torch.randint(3, SMOLLM2_135M["vocab_size"], (1, P), generator=torch.Generator().manual_seed(P))
            measure("decode", sides, ids.to(DEVICE), args.new, args.repeats, args.warmup,
                    {"prompt": P, "new": args.new, "dtype": args.dtype})
        guarded("decode", f"prompt {P}", one)


def compiled_section(args) -> None:
    import graphwright as gw

    dtype = getattr(torch, args.dtype)
    model = smollm2_shaped(dtype)
    for P in args.prompts:
        def one(P=P):
            t0 = time.perf_counter()
            sides = {"hf": Synced(HFSide(model, SMOLLM2_135M["pad_token_id"])),
                     "identity/torch": Synced(GWSide(gw.compile(model, verify=False))),
                     "identity/compiled": Synced(GWSide(gw.compile(model, backend="compiled", verify=False))),
                     "streaming25/compiled": Synced(GWSide(gw.compile(model, recipe=recipe_text("streaming25", P),
                                                                      backend="compiled", verify=False)))}
            ids = torch.randint(3, SMOLLM2_135M["vocab_size"], (1, P), generator=torch.Generator().manual_seed(P))
            measure("compiled", sides, ids.to(DEVICE), args.new, args.repeats, args.warmup,
                    {"prompt": P, "new": args.new, "dtype": args.dtype,
                     "build_and_run_s": round(time.perf_counter() - t0, 1)})
        guarded("compiled", f"prompt {P}", one)


def main(argv=None) -> int:
    global OUT, DEVICE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", choices=["tiny", "decode", "compiled"])
    p.add_argument("--out", default=".")
    p.add_argument("--prompts", type=int, nargs="+", default=[2048, 8064])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backends", nargs="+", default=["torch", "triton"])
    p.add_argument("--recipes", nargs="+", default=list(EVICTION), choices=list(EVICTION))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the code paths")
    a = p.parse_args(argv)
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_checks: no CUDA GPU here (these checks run on a GPU machine; CPU tests: pytest tests/triton)")
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    {"tiny": tiny_section, "decode": decode_section, "compiled": compiled_section}[a.section](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
