"""Where an ONNX decode step goes: ONNX Runtime's per-op-type totals for the T = 1 steps of an artifact.

Usage (artifacts from ``bench/bench_decode.py --export-only --prompts 256 --artifacts DIR``)::

    python bench/profile_onnx_decode.py DIR/smollm2_135m_identity DIR/smollm2_135m_h2o_heavy_32_recent_32 \
        --prompt 256 --new 64 --threads 2 [--host]

For each artifact: one greedy generation of ``--new`` tokens after a ``--prompt``-token prompt (the shipped
novel) with ``SessionOptions.enable_profiling`` on the session that runs the T = 1 steps (``decode.onnx``
when the artifact has one, else ``model.onnx``; its first run, the prompt, is left out). Prints, per op
type, the total kernel time per decode step (ms), its share and the node count per step, then the
session-run time per step and the wall time per step of the whole loop (the difference is the host side:
``OnnxStep.__call__``, I/O binding, the runtime loop). ``--host``: a cProfile of the decode loop (the top
functions by cumulative time) without ORT profiling; ``--bind-ab N``: decode tok/s with the
host-side binding shortcut (``artifact.FAST_BIND``) on and off, alternating N times in one process;
``--compare N [--option SET]``: decode tok/s of every artifact given (under one option set), alternating N times
(ratios to the first); an artifact written ``PATH@KEY=VALUE[,KEY=VALUE]`` is loaded with those options too (``--compare``
and the profile), e.g. ``ART@inplace=0``;
``--session-ab N --option KEY=VALUE[,KEY=VALUE] ...``: decode tok/s of the first artifact under each set of
session options (``threads=N``, ``arena=0|1``, ``spinning=0|1``, ``inplace=0|1`` (the dense in-place KV cache,
``codegen/onnx/inplace_kv.py``: on by default) or any ``SessionOptions`` config entry, e.g.
``session.disable_prepacking=1``), alternating N times, ratios to the plain options. Timings on a busy machine
are indicative only; the CPU ms/step column (process CPU time) is the less load-sensitive one, except
across ``spinning`` settings (a spinning thread burns CPU while it waits: compare tok/s there, on an idle machine).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import graphwright as gw


def prompt_ids(length: int, tokenizer) -> torch.Tensor:
    text = (Path(gw.__file__).parent / "data" / "northangerabbey.txt").read_text(encoding="utf-8")
    return tokenizer(text[: 8 * length], return_tensors="pt", add_special_tokens=False).input_ids[:, :length]


def load(folder: Path, threads: int, profile_prefix: str | None, options: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = False  # as bench_decode.py
    so.intra_op_num_threads = threads
    inplace = None
    for key, value in (options or {}).items():
        if key == "inplace":  # codegen/onnx/inplace_kv.py: dense KV updated in place (1) or appended by Concat (0)
            inplace = value == "1"
        elif key == "threads":
            so.intra_op_num_threads = int(value)
        elif key == "arena":
            so.enable_cpu_mem_arena = value == "1"
        elif key == "spinning":
            so.add_session_config_entry("session.intra_op.allow_spinning", value)
        elif key.startswith("session.") or key.startswith("optimization."):
            so.add_session_config_entry(key, value)
        else:
            raise SystemExit(f"--option {key}={value}: unknown; use threads, arena, spinning, inplace or a session config key (session.*)")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if inplace is None:
        return gw.load(folder, session_options=so)
    from graphwright.codegen.onnx import inplace_kv

    default, inplace_kv.ENABLED = inplace_kv.ENABLED, inplace
    try:
        return gw.load(folder, session_options=so)
    finally:
        inplace_kv.ENABLED = default


def op_table(events: list, skip_first_run: bool) -> tuple[dict, int, float]:
    """({op type: (total us, node count)}, decode runs, total session-run us) over the decode runs."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    if skip_first_run:
        runs = runs[1:]
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    totals: dict = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(a <= e["ts"] <= b for a, b in spans):
            t = totals[e.get("args", {}).get("op_name", "?")]
            t[0] += e["dur"]
            t[1] += 1
    return totals, len(runs), sum(r["dur"] for r in runs)


def profile(folder: Path, prompt: int, new: int, threads: int) -> None:
    folder, opts = split_spec(folder)
    with tempfile.TemporaryDirectory() as tmp:
        m = load(folder, threads, str(Path(tmp) / "ort"), opts)
        ids = prompt_ids(prompt, m.tokenizer)
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=new, eos_token_id=[])
        wall = time.perf_counter() - t0
        stats = dict(m.last_stats)
        decode = m.step.decode["session"] if m.step.decode else m.step.session
        path = decode.end_profiling()
        events = json.loads(Path(path).read_text())
    totals, runs, run_us = op_table(events, skip_first_run=m.step.decode is None)
    steps = max(runs, 1)
    kernel = sum(t for t, _ in totals.values())
    print(f"\n== {folder.name}: {runs} decode runs ({'decode.onnx' if m.step.decode else 'model.onnx'}), "
          f"decode {stats.get('decode_tokens_per_s', float('nan')):.1f} tok/s (profiling on), loop wall {wall:.2f} s")
    print(f"{'op type':<28}{'ms/step':>9}{'share':>8}{'nodes/step':>12}")
    for op, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"{op:<28}{us / steps / 1e3:>9.3f}{us / max(kernel, 1):>8.1%}{n / steps:>12.0f}")
    print(f"{'kernels':<28}{kernel / steps / 1e3:>9.3f}{'':>8}{sum(n for _, n in totals.values()) / steps:>12.0f}")
    print(f"{'session run':<28}{run_us / steps / 1e3:>9.3f}   (kernels + ORT's own per-node overhead)")


def host(folder: Path, prompt: int, new: int, threads: int, top: int = 25) -> None:
    m = load(folder, threads, None)
    ids = prompt_ids(prompt, m.tokenizer)
    m.generate(ids, max_new_tokens=4, eos_token_id=[])  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    m.generate(ids, max_new_tokens=new, eos_token_id=[])
    prof.disable()
    print(f"\n== host side of {folder.name} ({new} new tokens), by cumulative time")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def bind_ab(folder: Path, prompt: int, new: int, threads: int, rounds: int) -> None:
    """Decode tok/s with ``artifact.FAST_BIND`` on and off, alternating in this process (medians)."""
    from statistics import median

    from graphwright.codegen.onnx import artifact

    m = load(folder, threads, None)
    ids = prompt_ids(prompt, m.tokenizer)
    m.generate(ids, max_new_tokens=4, eos_token_id=[])  # warm-up
    got = {True: [], False: []}
    for i in range(2 * rounds):
        artifact.FAST_BIND = fast = i % 2 == 0
        m.generate(ids, max_new_tokens=new, eos_token_id=[])
        got[fast].append(m.last_stats["decode_tokens_per_s"])
    artifact.FAST_BIND = True
    on, off = median(got[True]), median(got[False])
    print(f"{folder.name}: decode tok/s fast binding {on:.2f}, public IOBinding methods {off:.2f}, ratio {on / off:.3f} "
          f"({rounds} alternating rounds)")


def parse_options(texts: list) -> list:
    """``["threads=1,spinning=0", ...]`` -> ``[{}, {"threads": "1", "spinning": "0"}, ...]`` (the plain options first)."""
    sets = [{}]
    for text in texts:
        pairs = [p for p in text.split(",") if p]
        if any("=" not in p for p in pairs):
            raise SystemExit(f"--option {text!r}: expected KEY=VALUE[,KEY=VALUE]")
        sets.append(dict(p.split("=", 1) for p in pairs))
    return sets


def split_spec(folder: Path) -> tuple:
    """``PATH@KEY=VALUE[,KEY=VALUE]`` -> (PATH, {KEY: VALUE}): options for one artifact of ``--compare`` or a profile,
    e.g. ``ART@inplace=0`` (the decode graph as exported, its appends not in place: session 12's duo step)."""
    text = str(folder)
    if "@" not in Path(text).name:
        return Path(text), {}
    path, opts = text.rsplit("@", 1)
    return Path(path), parse_options([opts])[1]


def compare(folders: list, prompt: int, new: int, threads: int, rounds: int, options: list | None = None) -> None:
    """Decode tok/s of every artifact (or of ``folders[0]`` under each of ``options``), alternating in this
    process (medians; the first is the reference)."""
    from statistics import median

    if len(options or ()) > 1:
        models = [load(folders[0], threads, None, o) for o in options]
        labels = [",".join(f"{k}={v}" for k, v in o.items()) or "plain" for o in options]
    else:  # one option set (or none) for every artifact, plus each artifact's own (``PATH@KEY=VALUE``, ``split_spec``)
        models = [load(f, threads, None, {**(options or [{}])[0], **o}) for f, o in map(split_spec, folders)]
        labels = [str(f)[-56:] for f in folders]
    ids = prompt_ids(prompt, models[0].tokenizer)
    for m in models:
        m.generate(ids, max_new_tokens=4, eos_token_id=[])  # warm-up
    got, cpu = [[] for _ in models], [[] for _ in models]
    for _ in range(rounds):
        for m, g, c in zip(models, got, cpu):
            t0 = time.process_time()
            m.generate(ids, max_new_tokens=1, eos_token_id=[])
            t1 = time.process_time()
            m.generate(ids, max_new_tokens=new, eos_token_id=[])
            t2 = time.process_time()
            g.append(m.last_stats["decode_tokens_per_s"])
            c.append(((t2 - t1) - (t1 - t0)) / (new - 1) * 1e3)  # process CPU ms per decode step (all threads)
    ref, ref_cpu = median(got[0]), median(cpu[0])
    print(f"decode, prompt {prompt}, {new} new tokens, {rounds} alternating rounds (medians; ratios to {labels[0]}); "
          "CPU ms/step: process CPU time per decode step, all threads (less sensitive to other load than wall time)")
    for label, g, c in zip(labels, got, cpu):
        print(f"  {label:<56} {median(g):7.2f} tok/s x{median(g) / ref:.3f} | CPU {median(c):7.2f} ms/step "
              f"x{ref_cpu / median(c):.3f} | runs {[round(x, 2) for x in g]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path, help="exported artifact folders")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--host", action="store_true", help="cProfile the decode loop instead of ORT profiling")
    p.add_argument("--bind-ab", type=int, default=0, metavar="ROUNDS",
                   help="A/B the host-side binding (artifact.FAST_BIND on/off), alternating ROUNDS times")
    p.add_argument("--compare", type=int, default=0, metavar="ROUNDS",
                   help="decode tok/s of all artifacts, alternating ROUNDS times in this process (ratios to the first)")
    p.add_argument("--session-ab", type=int, default=0, metavar="ROUNDS",
                   help="decode tok/s of the first artifact under the plain options and each --option set, alternating ROUNDS times")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="a set of session options for --session-ab, or the one set of --compare "
                        "(threads, arena, spinning, session.* config keys)")
    args = p.parse_args()
    if args.option and not (args.session_ab or args.compare):
        p.error("--option needs --session-ab ROUNDS (or --compare ROUNDS: one set, used for every artifact)")
    if args.option and args.compare and len(args.option) > 1:
        p.error("--compare takes one --option set (used for every artifact); several sets are for --session-ab")
    torch.set_num_threads(args.threads)
    for folder in args.artifacts:
        if not (split_spec(folder)[0] / "graphwright.json").is_file():
            raise SystemExit(f"{folder}: not an exported artifact (no graphwright.json)")
    if args.session_ab:
        if not args.option:
            p.error("--session-ab needs at least one --option set to compare with the plain options")
        compare(args.artifacts[:1], args.prompt, args.new, args.threads, args.session_ab, parse_options(args.option))
        return
    if args.compare:
        compare(args.artifacts, args.prompt, args.new, args.threads, args.compare, parse_options(args.option)[1:])
        return
    for folder in args.artifacts:
        if args.bind_ab:
            bind_ab(folder, args.prompt, args.new, args.threads, args.bind_ab)
        else:
            (host if args.host else profile)(folder, args.prompt, args.new, args.threads)


if __name__ == "__main__":
    main()
