"""Peak resident memory of one long-prompt generation per recipe: dense against KV eviction at 25%.

Usage (the issue's memory target, 8k prompt):

    python bench/bench_peak_memory.py --prompt 8192 --new 16

Per recipe (``identity`` = dense, then ``streaming``, ``h2o``, ``snapkv`` written for 25% of the
prompt as in ``bench/bench_decode.py``), a fresh subprocess loads the model, compiles the recipe on
the torch runtime and runs ``cm.generate`` on the first ``--prompt`` tokens of the shipped novel
plus ``--new`` greedy tokens inside ``graphwright.bench.memory.PeakMemory``: the peak increase of
the process's resident set over its value just before the call (prefill activations and the
caches the generation builds; the weights are resident before). One process per recipe, so no
recipe inherits another's freed-but-resident pages. Printed as a table with KV bytes held at the
end and ratios to dense; ``--out`` also writes JSON. Memory, not time: a loaded machine changes
these numbers little, but they are per process, not absolute accounting (see ``PeakMemory``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import prompt_ids, recipe_text  # noqa: E402

import graphwright as gw  # noqa: E402
from graphwright.bench.memory import PeakMemory  # noqa: E402

DEFAULT_RECIPES = ["identity", "streaming25", "h2o25", "snapkv25"]


def measure_one(model_name: str, recipe: str, prompt: int, new: int, threads: int) -> dict:
    """In this process: peak RSS increase of ``cm.generate`` for one recipe."""
    torch.set_num_threads(threads)
    model, tok = gw.load_model(model_name)
    model.eval()
    ids = prompt_ids(tok, prompt, model.config.vocab_size)
    text = recipe_text(recipe, prompt)
    cm = gw.compile(model, recipe=text, tokenizer=tok)
    with PeakMemory() as mem:
        cm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, eos_token_id=[])
    s = cm.last_stats
    return {"recipe": recipe, "text": text, "peak_mem_bytes": mem.peak_bytes, "kv_bytes": s["kv_bytes"],
            "kv_bytes_dense": s["kv_bytes_dense"]}


def measure_in_subprocess(args, recipe: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--prompt", str(args.prompt),
               "--new", str(args.new), "--threads", str(args.threads), "--one", recipe, "--one-out", str(out)]
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            raise SystemExit(f"recipe {recipe}: the measuring process failed with exit status {rc}")
        return json.loads(out.read_text())


def table(rows: list[dict], prompt: int, new: int) -> str:
    dense = rows[0]
    lines = [f"peak RSS increase of cm.generate, prompt {prompt} + {new} new tokens, one process per recipe", "",
             "| recipe | peak RSS +MB | / dense | KV MB held | KV / dense | dense - this, peak MB | KV saved MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['text'] or 'identity (dense)'} | {r['peak_mem_bytes'] / 1e6:,.0f} | "
                     f"{r['peak_mem_bytes'] / max(1, dense['peak_mem_bytes']):.2f} | {r['kv_bytes'] / 1e6:.1f} | "
                     f"{r['kv_bytes'] / max(1, dense['kv_bytes']):.2f} | "
                     f"{(dense['peak_mem_bytes'] - r['peak_mem_bytes']) / 1e6:,.0f} | {(dense['kv_bytes'] - r['kv_bytes']) / 1e6:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", type=int, default=8192, help="prompt tokens (the first N tokens of the shipped novel)")
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES,
                   help="recipe names as in bench_decode.py (identity is always first: the dense baseline)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the rows as JSON here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        Path(args.one_out).write_text(json.dumps(measure_one(args.model, args.one, args.prompt, args.new, args.threads)))
        return 0
    recipes = ["identity"] + [r for r in args.recipes if r != "identity"]
    rows = []
    for r in recipes:
        rows.append(measure_in_subprocess(args, r))
        print(f"  {r}: peak +{rows[-1]['peak_mem_bytes'] / 1e6:,.0f} MB, KV {rows[-1]['kv_bytes'] / 1e6:.1f} MB", flush=True)
    print(table(rows, args.prompt, args.new))
    if args.out:
        Path(args.out).write_text(json.dumps({"prompt": args.prompt, "new": args.new, "model": args.model, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
