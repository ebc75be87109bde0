"""Decode speed, memory and KV bytes of every runtime x recipe x prompt length, in one run.

Usage (the README's speed table):

    python bench/bench_decode.py --prompts 256 2048 4096 8064 --new 128 --repeats 2

Sides: HF ``generate()`` (the original model), and per recipe graphwright's torch runtime
(``backend="torch"``), its compiled torch path (``backend="compiled"``, when that backend is
registered) and the ONNX Runtime artifact (``export_onnx`` + ``graphwright.load``; exports are
cached under ``--artifacts`` by recipe). Recipes (``--recipes``, names below, or any recipe text)
are written for 25% of the dense KV at each prompt length where the pass takes token counts.

Protocol: per prompt length, every side generates exactly ``--new`` greedy tokens from the same
prompt (the first P tokens of the shipped novel), sides alternating within each repeat (the order
rotates between repeats so no side always runs first or after the same neighbour); medians over
repeats after ``--warmup`` rounds. Reported per side: prefill and decode tokens/s, peak resident
memory increase during the generation (``graphwright.bench.memory.PeakMemory``), KV bytes held
at the end, ratios to HF and to dense graphwright (identity) on the same runtime, and whether the
tokens equal HF's. ``graphwright.bench.load.MachineLoad`` watches each prompt length: when other
processes used more than 10% of the machine during it, or in the 10 s window before it (``wait_for_quiet``
waits up to ``--wait-quiet`` seconds for a window under 10%; their share, not the load average, which counts this
process's own compile for a minute), the length is marked busy, the markdown says so, and the script exits with status 3 unless
``--allow-busy``: a busy run is not a result.

Decode steps interleaved (``--steps``, default 128; session 17): after the rounds, every side of the block
prefills the prompt and the sides then take one decode step each in turn (HF: its ``DynamicCache`` step as
``generate()`` runs it; graphwright: ``runtime.step``), so a change of the host's speed hits every side alike.
Reported: median ms per step and the medians of each step's speed over HF's and dense's (same runtime) step.
On this shared host whole generations moved by up to 20% between rounds of a quiet machine; the interleaved
ratios are the steady ones. ONNX Runtime's intra-op threads spin-wait after a run (its default) and slow the
side that runs next, so the ORT rows' step columns are marked not comparable unless ``--ort-spin off``.

Memory: each (prompt length, runtime) block runs in its own subprocess (``--block``), holding only
HF and that runtime's recipes (dense identity always among them, so every ratio is taken within one
process); holding every side of every runtime in one process was OOM-killed at 24 GB at 4k. ONNX
Runtime sessions are made with ``enable_cpu_mem_arena=False`` (the arena keeps its peak forever).
``--same-process`` runs the blocks in this process instead (for debugging).

Writes ``<out>.json`` (everything, raw runs included), ``<out>.md`` (the table) and ``<out>.png``
(decode tokens/s against prompt length, one line per recipe and runtime).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from pathlib import Path
from statistics import median, median_low

import torch

import graphwright as gw
from graphwright.bench.load import MachineLoad, wait_for_quiet
from graphwright.bench.memory import PeakMemory
from graphwright.bench.timing import cache_bytes, rotated, step_timer
from graphwright.cli.cmd_demo import DEMO_RECIPE

RECIPES = {  # name -> recipe text; {q} = a quarter of the prompt in tokens
    "identity": None,
    # the composed recipe of the ONNX tests (latent keys + fraction H2O); NOT the demo's recipe, which is
    # question-aware SnapKV at a quarter of the prompt (`graphwright demo`): that is the snapkv25 row
    "lowrank80_h2o": DEMO_RECIPE,
    "h2o25": "h2o(heavy={q8}, recent={q8})",  # token counts: ONNX evicts in-graph (fractions stay split)
    "streaming25": "streaming(sinks=4, window={q_minus_sinks})",
    "snapkv25": "snapkv(budget={q})",
    "lowrank50": "lowrank_kv(keep=0.5)",
    # issue 18's best recipe at <= 50% KV on the needle suite at 1k: retrieval heads keep everything, streaming heads
    # sinks + 256 recent tokens, with the shipped head set
    "duo": "duo(sinks=4, window=256)",
    # issue 18's best recipe at <= 25% KV (session 29: 94-99% of dense on RULER multi-value needles at 1k-4k): the
    # prompt's budget shared across each layer's KV heads by the shipped needle-mass head set
    "mass25": 'snapkv(budget={q}, heads="scores", gamma=1.0, headset="shipped:mass")',
}
DEFAULT_RECIPES = list(RECIPES)
RUNTIMES = ("torch", "compiled", "onnx")
METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_mem_bytes", "kv_bytes", "kv_bytes_dense")


def recipe_text(name: str, prompt: int) -> str | None:
    text = RECIPES.get(name, name)
    if text is None:
        return None
    return text.format(q=max(1, prompt // 4), q8=max(1, prompt // 8), q_minus_sinks=max(1, prompt // 4 - 4))


def prompt_ids(tokenizer, length: int, vocab: int) -> torch.Tensor:
    """The first ``length`` tokens of the shipped novel (real text: eviction scores behave as on user
    prompts); seeded random ids for a model without a tokenizer (the tiny test models)."""
    if tokenizer is None:
        return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    text = (Path(gw.__file__).parent / "data" / "northangerabbey.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[: 8 * length], return_tensors="pt", add_special_tokens=False).input_ids[:, :length]
    if ids.shape[1] < length:
        raise SystemExit(f"the shipped text has {ids.shape[1]} tokens; --prompts must be <= that")
    return ids


class HFSide:
    def __init__(self, model, pad):
        self.model, self.pad = model, pad

    @torch.inference_mode()
    def run(self, ids, new):
        from transformers import LogitsProcessorList

        timer = step_timer()
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=self.pad, logits_processor=LogitsProcessorList([timer]),
                                  return_dict_in_generate=True)
        end = time.perf_counter()
        prefill_s, decode_s = timer.stamps[0] - t0, end - timer.stamps[0]
        kv = cache_bytes(out.past_key_values)
        return out.sequences, {"prefill_tokens_per_s": ids.shape[1] / prefill_s,
                               "decode_tokens_per_s": (len(timer.stamps) - 1) / decode_s,
                               "kv_bytes": kv, "kv_bytes_dense": kv}


class GWSide:
    def __init__(self, runner):
        self.runner = runner

    def run(self, ids, new):
        out = self.runner.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, eos_token_id=[])
        s = self.runner.last_stats
        return out, {k: s[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "kv_bytes", "kv_bytes_dense")}


class HFStepper:
    """HF's decode step as ``generate()`` runs it (``model(next, past_key_values=cache)``, its ``DynamicCache``),
    without the logits processors: HF's per-step cost, slightly below ``generate()``'s."""

    name = "original/hf"  # its side's key in bench_decode's blocks and its label in profile_decode_step

    def __init__(self, model):
        self.model = model

    def start(self, ids):
        from transformers import DynamicCache

        self.cache, self.pos = DynamicCache(), ids.shape[1]
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self):
        pos = torch.tensor([[self.pos]])
        out = self.model(input_ids=self.next, past_key_values=self.cache, use_cache=True, position_ids=pos,
                         cache_position=pos[0], logits_to_keep=1)
        self.pos += 1
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)


class RuntimeStepper:
    """A graphwright runner's decode step (``CompiledModel`` or ``OnnxModel``: ``runtime.prefill`` makes the
    compressed context, then ``runtime.step`` one token at a time, as ``generate`` does)."""

    def __init__(self, runner):
        self.rt = runner._runtime

    def start(self, ids):
        ctx = self.rt.prefill(ids, torch.ones_like(ids), recipe=self.rt.recipe)
        self.state, self.pos = ctx.state, ctx.next_positions
        self.next = ctx.last_logits.argmax(-1, keepdim=True)
        self.zero = torch.zeros(1, dtype=torch.long)
        # the state is this stepper's own, as in ``generate``: an ONNX step may write it in place (inplace_slots.py)
        self.donate = {"donate_state": True} if getattr(self.rt.step, "takes_donated_state", False) else {}

    def step(self):
        logits, self.state = self.rt.step(self.next, self.pos, self.zero, self.state, **self.donate)
        self.pos = self.pos + 1
        self.next = logits[:, -1].argmax(-1, keepdim=True)


def stepper(side):
    return HFStepper(side.model) if isinstance(side, HFSide) else RuntimeStepper(side.runner)


@torch.inference_mode()
def interleaved_steps(sides: dict, ids, steps: int, warmup: int = 2) -> dict:
    """Decode ms per step with the sides interleaved step by step: every side prefills ``ids``, then step i of
    every side runs before step i + 1 of any (the order rotating each step), so a change of the host's speed
    hits every side alike. Each step's time is divided by HF's and dense's (same runtime) of the same step; the
    medians of those are the steadiest ratios this host gives (whole generations alternate over ~10 s windows, in
    which this shared host's speed moves by up to 20%). -> {side: {"ms": median ms, "cpu_ms": ..., "steps": n}}"""
    st = {k: stepper(s) for k, s in sides.items()}
    for s in st.values():
        s.start(ids)
    for s in st.values():
        for _ in range(warmup):
            s.step()
    keys = list(st)
    wall, cpu = {k: [] for k in keys}, {k: [] for k in keys}
    for i in range(steps):
        for k in rotated(keys, i):
            c0, t0 = time.process_time(), time.perf_counter()
            st[k].step()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    out = {}
    for k in keys:
        rt = k.split("/")[1]
        row = {"ms": 1e3 * median(wall[k]), "cpu_ms": 1e3 * median(cpu[k]), "steps": steps}
        for name, base in (("vs_hf", "original/hf"), ("vs_dense", f"identity/{rt}")):
            if base in wall and rt != "hf":
                row[name] = median(b / a for a, b in zip(wall[k], wall[base]))  # speed ratio: base time / this time
        out[k] = row
    return out


def export_artifact(cm, recipe: str | None, model_name: str, artifacts: Path) -> Path:
    """Export once per (model, recipe) into ``artifacts`` (reused when its graphwright.json names the same recipe)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{model_name}_{recipe or 'identity'}").strip("_")
    folder = artifacts / slug
    meta = folder / "graphwright.json"
    if not (meta.exists() and json.loads(meta.read_text()).get("bench_recipe") == (recipe or "identity")):
        t0 = time.perf_counter()
        gw.export_onnx(cm, folder, overwrite=True)
        data = json.loads(meta.read_text())
        data["bench_recipe"] = recipe or "identity"
        meta.write_text(json.dumps(data, indent=2))
        print(f"  exported {recipe or 'identity'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def onnx_runner(cm, recipe: str | None, model_name: str, artifacts: Path, threads: int, spin: str = "on"):
    folder = export_artifact(cm, recipe, model_name, artifacts)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = False  # the arena keeps a session's peak resident for the process's lifetime
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin == "on" else "0")
    return gw.load(folder, session_options=so)


def build_sides(model, tok, model_name, prompt, recipes, runtimes, args):
    info_pad = None
    sides, skipped = {}, {}
    for name in recipes:
        text = recipe_text(name, prompt)
        for rt in runtimes:
            key = f"{name}/{rt}"
            try:
                if rt == "onnx":
                    cm = gw.compile(model, recipe=text, tokenizer=tok)
                    sides[key] = GWSide(onnx_runner(cm, text, model_name, Path(args.artifacts), args.ort_threads, args.ort_spin))
                else:
                    cm = gw.compile(model, recipe=text, tokenizer=tok, backend=rt)
                    sides[key] = GWSide(cm)
                info_pad = info_pad or cm.info
            except Exception as e:  # a runtime that cannot take a recipe is a row that says why, not a crash
                skipped[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"  skipped {key}: {skipped[key]}", flush=True)
    pad = info_pad.pad_token_id if info_pad and info_pad.pad_token_id is not None else (tok.eos_token_id or 0)
    return {"original/hf": HFSide(model, pad), **sides}, skipped


def measure(sides, ids, new, repeats, warmup):
    keys = list(sides)
    runs = {k: [] for k in keys}
    tokens = {}
    for r in range(warmup + repeats):
        line = []
        for k in rotated(keys, r):
            with PeakMemory() as mem:
                out, row = sides[k].run(ids, new)
            row["peak_mem_bytes"] = mem.peak_bytes
            tokens[k] = out
            line.append(f"{k} {row['decode_tokens_per_s']:.1f}")
            if r >= warmup:
                runs[k].append(row)
        print(f"  round {r}{' (warmup)' if r < warmup else ''}: decode tok/s " + ", ".join(line), flush=True)
    med = {k: {m: (median_low if "bytes" in m else median)(row[m] for row in runs[k]) for m in METRICS} for k in keys}
    same = {k: bool(torch.equal(tokens[k], tokens["original/hf"])) for k in keys}
    return med, same, runs


def _paired(runs: dict, k: str, base: str) -> tuple[float, float, float] | None:
    """Median, min and max over rounds of side ``k``'s decode tokens/s over ``base``'s in the same round.

    Sides of one round run back to back, so a per-round ratio cancels the host's drift between rounds
    (this shared host's speed moves by up to 20% between rounds of a quiet machine); the median of
    the per-round ratios is the reported ratio and the min-max says how steady it was."""
    a, b = runs.get(k) or [], runs.get(base) or []
    if not a or len(a) != len(b):
        return None
    r = [x["decode_tokens_per_s"] / y["decode_tokens_per_s"] for x, y in zip(a, b)]
    return median(r), min(r), max(r)


def ratios(med: dict, runs: dict | None = None) -> dict:
    """Ratios to HF and to dense on the same runtime: paired per round (``_paired``) when the raw
    rounds are given, else of the medians."""
    out = {}
    hf = med["original/hf"]
    for k, m in med.items():
        rt = k.split("/")[1]
        dense_key = f"identity/{rt}" if rt != "hf" else "original/hf"
        dense = med.get(dense_key)
        row = {"decode_vs_hf": m["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
               "prefill_vs_hf": m["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"],
               "decode_vs_dense_same_runtime": m["decode_tokens_per_s"] / dense["decode_tokens_per_s"] if dense else None,
               "kv_fraction_of_hf": m["kv_bytes"] / hf["kv_bytes"] if hf["kv_bytes"] else None}
        if runs is not None:
            for name, base in (("decode_vs_hf", "original/hf"), ("decode_vs_dense_same_runtime", dense_key)):
                pair = _paired(runs, k, base) if dense else None
                if pair is not None:
                    row[name], row[name + "_range"] = pair[0], [pair[1], pair[2]]
        out[k] = row
    return out


def _ratio_cell(r: dict, name: str) -> str:
    rng = r.get(name + "_range")
    return f"{r[name]:.2f}" + (f" ({rng[0]:.2f}-{rng[1]:.2f})" if rng and rng[0] != rng[1] else "")


def _step_cells(block: dict, key: str, rt: str) -> str:
    """The interleaved-step columns: ms per step, and its speed over HF's / dense's of the same steps."""
    if rt.startswith("hf ("):  # one HF row per runtime block
        st = (block.get("hf_steps_by_runtime") or {}).get(rt[4:-7])
        return f"{st['ms']:.1f} | 1.00 | " if st else " | | "
    st = (block.get("steps") or {}).get(key)
    if not st:
        return " | | "
    return f"{st['ms']:.1f} | {st.get('vs_hf', 1.0):.2f} | {st['vs_dense']:.2f}" if "vs_dense" in st else f"{st['ms']:.1f} | 1.00 | "


def markdown(result) -> str:
    lines = [f"{result['model']}, CPU, {result['torch_threads']} torch threads, batch 1, {result['new_tokens']} new tokens, "
             f"median of {result['repeats']} alternating rounds (+{result['warmup']} warmup); ratios are medians of the "
             f"per-round ratios (each side over HF / dense of the same round), with their min-max over rounds. "
             f"Command: `{result['command']}`", ""]
    for P, block in result["prompts"].items():
        load = block["load"]
        state = "**BUSY: not a result**" if load["busy"] else "machine quiet"
        pre = load.get("foreign_before")
        pre = f", {100 * pre:.1f}% in the 10 s before" if pre is not None else ""
        lines += [f"#### prompt {P} tokens ({state}: other processes used {100 * load['foreign_share']:.1f}% of the "
                  f"{load['cores']} cores{pre}; load average {load['load_before'][0]:.2f} before, {load['load_after'][0]:.2f} after)", "",
                  "| recipe | runtime | prefill tok/s | decode tok/s | decode / HF | decode / dense same runtime | "
                  "step ms (interleaved) | step / HF | step / dense | KV MB held | KV / HF | peak RSS +MB | tokens = HF |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        rows, hf_rows = list(block["median"].items()), block.get("hf_by_runtime") or {}
        if hf_rows:  # one HF row per runtime block: every ratio is to the HF run of its own process
            rows = [r for rt in hf_rows for r in [(f"original/hf ({rt} block)", hf_rows[rt])]
                    + [(k, m) for k, m in block["median"].items() if k.split("/")[1] == rt]]
        for k, m in rows:
            name, rt = k.split("/")
            r = block["ratios"].get(k) or {"decode_vs_hf": 1.0, "decode_vs_dense_same_runtime": None, "kv_fraction_of_hf": 1.0}
            same = block["same_tokens"].get(k, True)
            dense = r["decode_vs_dense_same_runtime"]
            lines.append(f"| {block['recipes'].get(name) or name} | {rt} | {m['prefill_tokens_per_s']:,.0f} | "
                         f"{m['decode_tokens_per_s']:.1f} | {_ratio_cell(r, 'decode_vs_hf')} | "
                         f"{'' if rt == 'hf' or dense is None else _ratio_cell(r, 'decode_vs_dense_same_runtime')} | "
                         f"{_step_cells(block, k, rt)} | {m['kv_bytes'] / 1e6:.1f} | "
                         f"{r['kv_fraction_of_hf']:.2f} | {m['peak_mem_bytes'] / 1e6:.0f} | "
                         f"{'yes' if same else 'no'} |")
        for k, why in block["skipped"].items():
            lines.append(f"| {k.split('/')[0]} | {k.split('/')[1]} | not run: {why} | | | | | | | | | | |")
        if result.get("ort_spin", "on") == "on" and any(k.endswith("/onnx") for k in block.get("steps") or {}):
            lines.append("")
            lines.append("ORT rows, interleaved steps: **not comparable** (ONNX Runtime's intra-op threads spin after each run "
                         "and slow the side that runs next; see HF's step in the ORT block against the other blocks): read the "
                         "rounds' columns, or rerun with `--ort-spin off`.")
        lines.append("")
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for P, block in result["prompts"].items():
        for k, m in block["median"].items():
            series.setdefault(k, []).append((int(P), m["decode_tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {"hf": ("k", "--"), "torch": (None, "-"), "compiled": (None, "-."), "onnx": (None, ":")}
    for k, pts in sorted(series.items()):
        rt = k.split("/")[1]
        color, ls = styles.get(rt, (None, "-"))
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", linestyle=ls, color=color, label=k)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("decode tokens/s")
    busy = any(b["load"]["busy"] for b in result["prompts"].values())
    ax.set_title(f"{result['model']} decode speed, {result['new_tokens']} new tokens" + (" (BUSY MACHINE: not a result)" if busy else ""))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    # 8064 + 128 new tokens = 8192, SmolLM2's trained length (the runtime refuses to run past it by default)
    p.add_argument("--prompts", type=int, nargs="+", default=[256, 2048, 4096, 8064])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES,
                   help=f"recipe names ({', '.join(RECIPES)}) or recipe texts; identity is always added")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=128,
                   help="decode steps timed with the sides interleaved step by step after the rounds (0: none)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--ort-threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--ort-spin", choices=("on", "off"), default="on",
                   help="ONNX Runtime intra-op threads spin-wait after a run (its default: on). Its spinning threads slow "
                        "whichever side runs next, so the interleaved-step columns of ORT rows are only comparable with 'off'")
    p.add_argument("--artifacts", default="results/bench_decode_artifacts", help="ONNX export cache folder")
    p.add_argument("--out", default="results/bench_decode", help="output path without extension")
    p.add_argument("--allow-busy", action="store_true", help="exit 0 even when the machine was busy (still labelled)")
    p.add_argument("--wait-quiet", type=float, default=120.0, help="seconds to wait, before each block, for other processes to use <= 10%% of the "
                        "machine over a 10 s window (their share, not the load average, which counts this process's own compile)")
    p.add_argument("--export-only", action="store_true", help="only fill the --artifacts cache (exports need no quiet machine)")
    p.add_argument("--same-process", action="store_true", help="run every block in this process (more memory; for debugging)")
    p.add_argument("--block", nargs=2, metavar=("PROMPT", "RUNTIME"), help=argparse.SUPPRESS)
    p.add_argument("--block-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_block(args, P: int, rt: str) -> dict:
    """One (prompt length, runtime) block: HF + every recipe on ``rt``, alternating; plain data."""
    torch.set_num_threads(args.threads)
    recipes = ["identity"] + [r for r in args.recipes if r != "identity"]
    model, tok = gw.load_model(args.model)
    model.eval()
    ids = prompt_ids(tok, P, model.config.vocab_size)
    print(f"prompt {P}, runtime {rt}: compiling{'/exporting' if rt == 'onnx' else ''} {len(recipes)} recipes", flush=True)
    sides, skipped = build_sides(model, tok, args.model, P, recipes, [rt], args)
    quiet = 0.10  # the most of the machine other processes may use, before and during a block
    before = wait_for_quiet(max_foreign=quiet, timeout_s=args.wait_quiet, poll_s=min(10.0, max(args.wait_quiet, 0.5)))
    if before > quiet:
        print(f"  other processes kept using {100 * before:.0f}% of the machine: measuring anyway, the block will say busy",
              flush=True)
    with MachineLoad(max_foreign=quiet, foreign_before=before) as load:
        med, same, runs = measure(sides, ids, args.new, args.repeats, args.warmup)
        try:
            steps = interleaved_steps(sides, ids, args.steps) if args.steps else {}
        except Exception as e:  # the whole-generation rounds above stay a result; the row says why steps are missing
            steps = {}
            print(f"  interleaved steps failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    for k, r in steps.items():
        print(f"  interleaved steps {k}: {r['ms']:.1f} ms/step" + (f", {r['vs_hf']:.2f}x HF, {r['vs_dense']:.2f}x dense"
                                                                 if "vs_hf" in r else ""), flush=True)
    print(f"  {'BUSY' if load.busy else 'quiet'}: other processes used {100 * load.foreign_share:.1f}% of the machine", flush=True)
    return {"recipes": {n: recipe_text(n, P) for n in recipes}, "median": med, "ratios": ratios(med, runs), "same_tokens": same,
            "skipped": skipped, "load": {**load.as_dict(), "busy": load.busy}, "runs": runs, "steps": steps,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def block_in_subprocess(argv: list[str], P: int, rt: str) -> dict:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "block.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--block", str(P), rt, "--block-out", str(out)]
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            raise SystemExit(f"block prompt {P} runtime {rt} failed with exit status {rc}")
        block = json.loads(out.read_text())
    print(f"  block prompt {P} runtime {rt}: process peak RSS {block['process_peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    return block


def merge_blocks(blocks: dict) -> dict:
    """Blocks of one prompt length (runtime -> block) as one: HF's row from the first block, every ratio from its own block."""
    first = next(iter(blocks.values()))
    merged = {"recipes": first["recipes"], "median": {}, "ratios": {}, "same_tokens": {}, "skipped": {}, "runs": {}, "steps": {},
              "blocks_load": {rt: b["load"] for rt, b in blocks.items()},
              "process_peak_rss_bytes": {rt: b["process_peak_rss_bytes"] for rt, b in blocks.items()}}
    for b in blocks.values():
        for part in ("median", "ratios", "same_tokens", "skipped", "runs", "steps"):
            for k, v in b.get(part, {}).items():
                merged[part].setdefault(k, v)
    merged["hf_by_runtime"] = {rt: b["median"]["original/hf"] for rt, b in blocks.items()}
    merged["hf_steps_by_runtime"] = {rt: b.get("steps", {}).get("original/hf") for rt, b in blocks.items()}
    loads = [b["load"] for b in blocks.values()]
    worst = max(loads, key=lambda d: d["foreign_share"])
    before = [d["foreign_before"] for d in loads if d.get("foreign_before") is not None]
    merged["load"] = {**worst, "load_before": loads[0]["load_before"], "load_after": loads[-1]["load_after"],
                      "foreign_before": max(before) if before else None, "busy": any(d["busy"] for d in loads)}
    return merged


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.block:
        block = run_block(args, int(args.block[0]), args.block[1])
        Path(args.block_out).write_text(json.dumps(block))
        return 0
    torch.set_num_threads(args.threads)
    recipes = ["identity"] + [r for r in args.recipes if r != "identity"]
    if args.export_only:
        model, tok = gw.load_model(args.model)
        for P in args.prompts:
            for name in recipes:
                text = recipe_text(name, P)
                export_artifact(gw.compile(model, recipe=text, tokenizer=tok), text, args.model, Path(args.artifacts))
        print(f"artifacts in {args.artifacts}")
        return 0
    result = {"model": args.model, "torch_threads": args.threads, "new_tokens": args.new, "ort_spin": args.ort_spin,
              "repeats": args.repeats, "warmup": args.warmup, "runtimes": args.runtimes,
              "command": "python bench/bench_decode.py " + " ".join(argv), "prompts": {}}
    for P in args.prompts:
        blocks = {rt: run_block(args, P, rt) if args.same_process else block_in_subprocess(argv, P, rt) for rt in args.runtimes}
        result["prompts"][str(P)] = merge_blocks(blocks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    plot(result, out.with_suffix(".png"))
    print(md)
    print(f"written {out}.json, {out}.md, {out}.png")
    busy = [P for P, b in result["prompts"].items() if b["load"]["busy"]]
    if busy:
        print(f"the machine was busy during prompt length(s) {', '.join(busy)}: these numbers are not a result", file=sys.stderr)
        return 0 if args.allow_busy else 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
