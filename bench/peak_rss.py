"""Peak resident memory of one generation per side, each side in a fresh process: the memory target of issue 17.

Usage::

    python bench/peak_rss.py --prompt 8064 --new 32 ART/smollm2_135m_identity ART/smollm2_135m_streaming_... [--hf]

Why fresh processes. ``bench_decode.py`` measures every side in one process (``PeakMemory``: the RSS increase over
the RSS at entry), so a side that runs after another reuses the heap the first one freed and reports less than it
needs alone; with ORT's arena off, glibc keeps freed blocks below its mmap threshold, and the order of the sides moves
their peaks by hundreds of MB. Here each side is its own ``python`` process, run one after the other on the same
machine: it loads the model, then ``PeakMemory`` polls the RSS through ``generate(prompt, new tokens)`` (the prompt
step and the decode steps). Reported per side: the RSS after the imports, what loading added (the weights: an
artifact's sessions load one copy each unless ``--shared-weights on``, ``codegen/onnx/session_weights.py``), the
peak RSS of the process (the memory target compares these), and the peak increase over the RSS after load, the KV bytes the runtime
held after generating (``last_stats``), and the machine load while it ran (``MachineLoad``). ORT sessions: 2 intra-op
threads, no spinning, and ORT's CPU memory arena on as ``graphwright.load`` leaves it (``--arena off``: as
``bench_decode.py``; then glibc's retained heap adds ~1.7 GB to a one-shot 8k prompt step of an evicting artifact).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def one_side(spec: str, prompt: int, new: int, threads: int, arena: bool = True, shared: bool = False,
             state_order: bool = True, prompt_rows: bool = True) -> dict:
    """Runs in the child process: load ``spec`` (an artifact folder or ``hf``), generate, measure."""
    import psutil
    import torch

    import graphwright as gw
    from graphwright.bench.load import MachineLoad
    from graphwright.bench.memory import PeakMemory

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from ab_onnx_switch import prompt_ids

    from graphwright.codegen.onnx import prompt_rows as rows
    from graphwright.codegen.onnx import state_order as order

    order.ENABLED, rows.ENABLED = state_order, prompt_rows
    before_load = psutil.Process().memory_info().rss
    if spec == "hf":
        model, tok = gw.load_model("smollm2-135m")
        ids = prompt_ids(tok, prompt)
        loaded = psutil.Process().memory_info().rss
        with torch.inference_mode(), MachineLoad(max_foreign=0.10) as load, PeakMemory() as mem:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        kv = None
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = arena
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        m = gw.load(spec, session_options=so, share_weights=shared)
        ids = prompt_ids(m.tokenizer, prompt)
        loaded = psutil.Process().memory_info().rss
        with torch.inference_mode(), MachineLoad(max_foreign=0.10) as load, PeakMemory() as mem:
            out = m.generate(ids, max_new_tokens=new)
        kv = m.last_stats.get("kv_bytes")
    return {"side": Path(spec).name, "arena": arena if spec != "hf" else None, "shared_weights": shared if spec != "hf" else None,
            "state_order": state_order if spec != "hf" else None, "prompt_rows": prompt_rows if spec != "hf" else None,
            "before_load_bytes": before_load, "load_bytes": loaded - before_load, "peak_rss_bytes": loaded + mem.peak_bytes,
            "peak_bytes": mem.peak_bytes, "kv_bytes": kv,
            "new_tokens": int(out.shape[1] - prompt), "busy": load.busy, "foreign_share": load.foreign_share}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="*", help="ONNX artifact folders (each measured in its own process)")
    p.add_argument("--hf", action="store_true", help="also the Hugging Face model's generate()")
    p.add_argument("--prompt", type=int, default=8064)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arena", choices=["on", "off"], default="on",
                   help="ORT's CPU memory arena: on is what graphwright.load gives (ORT's default); bench_decode.py turns it off")
    p.add_argument("--shared-weights", choices=["on", "off"], default="off",
                   help="graphwright.load(share_weights=...): one mapped copy of the weights for an artifact's sessions "
                        "(codegen/onnx/session_weights.py; off by default, as graphwright.load)")
    p.add_argument("--state-order", choices=["on", "off"], default="on",
                   help="a prompt step's state written before the next layer's attention (codegen/onnx/state_order.py; on by default)")
    p.add_argument("--prompt-rows", choices=["on", "off"], default="on",
                   help="the MLP of a long prompt step in row blocks (codegen/onnx/prompt_rows.py; on by default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_side(args.child, args.prompt, args.new, args.threads, args.arena == "on", args.shared_weights == "on",
                                  args.state_order == "on", args.prompt_rows == "on")))
        return 0
    rows = []
    for spec in (["hf"] if args.hf else []) + list(args.artifacts):
        done = subprocess.run([sys.executable, __file__, "--child", spec, "--prompt", str(args.prompt), "--new", str(args.new),
                               "--threads", str(args.threads), "--arena", args.arena, "--shared-weights", args.shared_weights,
                               "--state-order", args.state_order, "--prompt-rows", args.prompt_rows],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        kv = "" if row["kv_bytes"] is None else f", KV held {row['kv_bytes'] / 1e6:.0f} MB"
        print(f"  {row['side']}: peak RSS {row['peak_rss_bytes'] / 1e6:.0f} MB (imports {row['before_load_bytes'] / 1e6:.0f} MB, "
              f"load +{row['load_bytes'] / 1e6:.0f} MB, generate +{row['peak_bytes'] / 1e6:.0f} MB){kv}; "
              f"{'BUSY' if row['busy'] else 'quiet'} (other processes {100 * row['foreign_share']:.1f}%)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"prompt": args.prompt, "new": args.new, "arena": args.arena,
                                        "shared_weights": args.shared_weights, "state_order": args.state_order,
                                        "prompt_rows": args.prompt_rows, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
