"""Decode steps of ONNX artifacts with a load-time graph switch off and on, alternating in one process.

Usage::

    python bench/ab_onnx_switch.py --switch decode_attention ART/smollm2_135m_identity [ART/...] --prompt 4096 \\
        --blocks 6 --block 8 [--threads 2]

``--prompt-steps N`` times N alternating prompt steps per side instead (with each step's peak resident increase):
the A/B for ``prompt_attention`` (``codegen/onnx/prompt_attention.ENABLED``: a long prompt step's attention and column
sums in query blocks).

``--switch``: ``decode_attention`` (``codegen/onnx/decode_attention.ENABLED``: one-row attention as grouped MatMuls)
``inplace_kv`` (``codegen/onnx/inplace_kv.ENABLED``: the dense cache, or a decode graph's appended states, updated in place)
or ``inplace_slots`` (``codegen/onnx/inplace_slots.ENABLED``: an evicting decode graph's slot K/V written in place)
or ``session_weights`` (``codegen/onnx/session_weights.ENABLED``: one mapped copy of the weights for the artifact's
sessions, MatMul weights not prepacked) or ``state_order`` (``codegen/onnx/state_order.ENABLED``: a prompt step's
state written before the next layer's attention) or ``prompt_rows`` (``codegen/onnx/prompt_rows.ENABLED``: the MLP
of a long prompt step in row blocks) or ``causal_columns`` (``codegen/onnx/prompt_attention.CAUSAL_COLUMNS``: a blocked
column sum reads only the keys before each block's causal edge) or ``packed_decode`` (``codegen/onnx/packed_decode.ENABLED``:
a packed Ada-KV cache's one-row step attends to the packed buffer, not a wide view). For each artifact it loads
the artifact twice (switch off, then on; ORT threads not spinning, no memory arena, as ``bench_decode.py``), runs one
prompt step of ``--prompt`` tokens of the shipped novel on each, then alternates ``--blocks`` blocks of ``--block``
greedy decode steps between the two, each continuing its own state. Prints per side the median wall and process-CPU
ms per decode step and the speed ratio on/off, checks that both sides produced the same tokens, and says whether
other processes used more than 10% of the machine meanwhile (``graphwright.bench.load.MachineLoad``: then the block
is labelled busy and is not a result).
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from statistics import median

import torch

import graphwright as gw
from graphwright.bench.load import MachineLoad, wait_for_quiet

SWITCHES = {"decode_attention": "graphwright.codegen.onnx.decode_attention", "inplace_kv": "graphwright.codegen.onnx.inplace_kv",
            "inplace_slots": "graphwright.codegen.onnx.inplace_slots",
            "prompt_attention": "graphwright.codegen.onnx.prompt_attention",
            "session_weights": "graphwright.codegen.onnx.session_weights", "state_order": "graphwright.codegen.onnx.state_order",
            "prompt_rows": "graphwright.codegen.onnx.prompt_rows", "packed_decode": "graphwright.codegen.onnx.packed_decode",
            "causal_columns": "graphwright.codegen.onnx.prompt_attention:CAUSAL_COLUMNS"}


def load(folder: Path, threads: int, switch: str, on: bool, arena: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena  # off as bench_decode.py (--arena on: as graphwright.load's default options)
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # bench_decode.py --ort-spin off
    path, _, attr = SWITCHES[switch].partition(":")
    module, attr = importlib.import_module(path), attr or "ENABLED"
    default = getattr(module, attr)
    setattr(module, attr, on)
    try:
        m = gw.load(folder, session_options=so)
    finally:
        setattr(module, attr, default)
    if switch == "inplace_kv":  # the dense step graph's cache, or a decode graph's appended states (rewrite_decode)
        d = m.step.decode
        got, why = (m.step.inplace, m.step.inplace_reason) if d is None else (d["inplace"], d["inplace_reason"])
        if (got is not None) != on:
            raise SystemExit(f"{folder}: in-place KV {'not available' if on else 'still on'} ({why})")
    if switch == "prompt_attention":  # the load check: the prompt graph's session was built from the rewritten proto
        import onnx

        from graphwright.codegen.onnx import prompt_attention

        if on and not prompt_attention.rewrite(onnx.load(str(folder / "model.onnx"), load_external_data=False)):
            raise SystemExit(f"{folder}: no attention or column sum of model.onnx can run in query blocks")
    if switch == "session_weights" and bool(m.weights and m.weights.mapped_bytes) != on:
        raise SystemExit(f"{folder}: the weights are {'not mapped' if on else 'still mapped'}")
    if switch == "inplace_slots" and bool(m.step.decode and m.step.decode["alias"]) != on:
        why = "not written in place (a graph exported before decode_rows.SPLIT_ROWS?)" if on else "still in place"
        raise SystemExit(f"{folder}: slot states {why}")
    return m


def _both(folder: Path, args) -> dict:
    """The artifact loaded with the switch off, then on (``--arena`` as asked)."""
    return {side: load(folder, args.threads, args.switch, side == "on", args.arena == "on") for side in ("off", "on")}


def prompt_ids(tokenizer, n: int):
    text = (Path(gw.__file__).parent / "data" / "northangerabbey.txt").read_text(encoding="utf-8")
    return tokenizer(text[: 8 * n], return_tensors="pt", add_special_tokens=False).input_ids[:, :n]


def ab(folder: Path, args) -> dict:
    """Alternating decode blocks of the artifact with the switch off and on; plain data."""
    models = _both(folder, args)
    ids = prompt_ids(models["on"].tokenizer, args.prompt)
    run = {}
    with torch.inference_mode():
        for name, m in models.items():
            state = [s.empty(1, torch.device("cpu")) for s in m.state_specs]
            logits, state = m.step(ids, torch.arange(ids.shape[1])[None], torch.tensor([ids.shape[1] - 1]), state)
            run[name] = {"state": state, "logits": logits, "pos": ids.shape[1], "tokens": [], "wall": [], "cpu": []}
        zero = torch.zeros(1, dtype=torch.long)
        before = wait_for_quiet(max_foreign=0.10, timeout_s=60.0, poll_s=5.0)
        with MachineLoad(max_foreign=0.10, foreign_before=before) as load_check:
            for _ in range(args.blocks):
                for name, m in models.items():
                    r = run[name]
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(args.block):
                        nxt = r["logits"][:, -1].argmax(-1)
                        r["tokens"].append(int(nxt))
                        # the loop's own state, donated as generate() does (inplace_slots.py)
                        r["logits"], r["state"] = m.step(nxt[:, None], torch.tensor([[r["pos"]]]), zero, r["state"],
                                                         donate_state=True)
                        r["pos"] += 1
                    r["wall"].append((time.perf_counter() - t0) / args.block * 1e3)
                    r["cpu"].append((time.process_time() - c0) / args.block * 1e3)
    off, on = run["off"], run["on"]
    return {"artifact": folder.name, "same_tokens": off["tokens"] == on["tokens"], "busy": load_check.busy,
            "foreign_share": load_check.foreign_share,
            **{f"{k}_{c}_ms": median(run[k][c]) for k in ("off", "on") for c in ("wall", "cpu")},
            "speed_on_over_off": median(off["wall"]) / median(on["wall"])}


def ab_prompt(folder: Path, args) -> dict:
    """Alternating prompt steps of ``--prompt`` tokens with the switch off and on (``--prompt-steps`` each); the peak
    resident increase of each step (``PeakMemory``) and whether both sides return the same logits and state."""
    from graphwright.bench.memory import PeakMemory

    models = _both(folder, args)
    ids = prompt_ids(models["on"].tokenizer, args.prompt)
    run = {k: {"wall": [], "cpu": [], "peak": []} for k in models}
    before = wait_for_quiet(max_foreign=0.10, timeout_s=60.0, poll_s=5.0)
    with torch.inference_mode(), MachineLoad(max_foreign=0.10, foreign_before=before) as load_check:
        for _ in range(args.prompt_steps):
            for name, m in models.items():
                state = [s.empty(1, torch.device("cpu")) for s in m.state_specs]
                t0, c0 = time.perf_counter(), time.process_time()
                with PeakMemory() as mem:
                    logits, state = m.step(ids, torch.arange(ids.shape[1])[None], torch.tensor([ids.shape[1] - 1]), state)
                run[name]["wall"].append(time.perf_counter() - t0)
                run[name]["cpu"].append(time.process_time() - c0)
                run[name]["peak"].append(mem.peak_bytes)
                run[name]["out"] = (logits, state)
    (lo, so), (ln, sn) = run["off"]["out"], run["on"]["out"]
    shapes = all(tuple(a.shape) == tuple(b.shape) for a, b in zip(so, sn))
    ints = [(a, b) for a, b in zip(so, sn) if not a.is_floating_point()]
    floats = [(a, b) for a, b in zip(so, sn) if a.is_floating_point() and a.numel()]
    rel = max([float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in floats] or [0.0]) if shapes else None
    return {"artifact": folder.name, "busy": load_check.busy, "foreign_share": load_check.foreign_share,
            "same_positions": shapes and all(torch.equal(a, b) for a, b in ints), "state_rel_diff": rel,
            "logits_diff": float((lo - ln).abs().max()),
            **{f"{k}_{c}": median(run[k][c]) for k in ("off", "on") for c in ("wall", "cpu", "peak")},
            "speed_on_over_off": median(run["off"]["wall"]) / median(run["on"]["wall"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts", type=Path, nargs="+")
    p.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arena", choices=["on", "off"], default="off",
                   help="ORT's CPU memory arena (default off, as bench_decode.py; graphwright.load's own default is on)")
    p.add_argument("--prompt-steps", type=int, default=0,
                   help="time N alternating prompt steps per side instead of decode steps (prompt_attention)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    what = (f"{args.prompt_steps} alternating prompt steps per side" if args.prompt_steps else
            f"{args.blocks} alternating blocks of {args.block} decode steps")
    print(f"switch {args.switch}: prompt {args.prompt}, {what}, {args.threads} threads, ORT arena {args.arena}", flush=True)
    for folder in args.artifacts:
        if args.prompt_steps:
            r = ab_prompt(folder, args)
            print(f"  {r['artifact']}: prompt step of {args.prompt} tokens off {r['off_wall']:.2f} s (CPU {r['off_cpu']:.2f}, "
                  f"peak +{r['off_peak'] / 1e6:.0f} MB), on {r['on_wall']:.2f} s (CPU {r['on_cpu']:.2f}, peak "
                  f"+{r['on_peak'] / 1e6:.0f} MB): **{r['speed_on_over_off']:.3f}x** prompt speed; same state shapes and kept "
                  f"positions: {r['same_positions']}, float states differ by {r['state_rel_diff']:.1e} of their largest value, "
                  f"logits by {r['logits_diff']:.1e}; {'BUSY' if r['busy'] else 'quiet'} "
                  f"(other processes {100 * r['foreign_share']:.1f}% of the machine)", flush=True)
            continue
        r = ab(folder, args)
        print(f"  {r['artifact']}: off {r['off_wall_ms']:.2f} ms/step (CPU {r['off_cpu_ms']:.2f}), on {r['on_wall_ms']:.2f} "
              f"(CPU {r['on_cpu_ms']:.2f}): **{r['speed_on_over_off']:.3f}x** decode speed; same tokens: "
              f"{r['same_tokens']}; {'BUSY' if r['busy'] else 'quiet'} (other processes "
              f"{100 * r['foreign_share']:.1f}% of the machine)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
