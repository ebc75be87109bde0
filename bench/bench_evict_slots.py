"""Decode speed of evicted models: the torch backend's slot eviction vs the compacting references.

Usage: python bench/bench_evict_slots.py [--model smollm2-135m] [--prompt 2000] [--steps 8] [--rounds 4] [--threads 1]

After a ``--prompt``-token prompt (the calibration paragraph repeated), decode ms per token of:
dense; ``h2o(heavy=256, recent=256)`` and ``streaming(sinks=4, window=508)`` (both keep 512 tokens
and evict at every step), each lowered twice: the torch backend as shipped (slots,
``codegen/torch/eviction_slots.py``) and the torch backend with the eviction references put back
(``compact`` at every step). One prefill per graph, its state copied for the two lowerings; then
``--rounds`` rounds of ``--steps`` greedy steps per variant, alternating variants, median of all
timed steps, as this thread's CPU time (what the step costs; on a shared machine wall time is
mostly the scheduler's share) and wall time. Prints the ratios, whether the two lowerings chose the same tokens, and a warning
when the machine was busy (load average above its core count; other processes share the cores,
so compare ratios, not absolute ms). One thread by default: on an oversubscribed machine every
parallel op waits for its slowest thread, which swamps what is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

import graphwright as gw
from graphwright.codegen.backends import EVICTION_REFERENCES, TORCH
from graphwright.compiled import CompiledModel
from graphwright.passes.pipeline import calibration_text

COMPACTING = dataclasses.replace(TORCH, name="torch_compacting", table={**TORCH.table, **EVICTION_REFERENCES})
RECIPES = {"dense": None, "h2o": "h2o(heavy=256, recent=256)", "streaming": "streaming(sinks=4, window=508)"}


def prompt_ids(tok, n: int) -> torch.Tensor:
    text = calibration_text()
    ids = tok(text, return_tensors="pt").input_ids[0]
    return ids.repeat(n // ids.numel() + 1)[:n][None]


@torch.inference_mode()
def prefill(cm, ids):
    state = cm.step_graph.init_state(1)
    pos = torch.arange(ids.shape[1])[None]
    logits, state = cm._step(ids, pos, torch.tensor([ids.shape[1] - 1]), state)
    return logits[:, -1].argmax(-1), pos[:, -1:] + 1, state


@torch.inference_mode()
def decode(v, steps: int):
    """Advance variant ``v`` (dict: cm, tok, pos, state, ms, toks) by ``steps`` timed greedy steps."""
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        logits, v["state"] = v["cm"]._step(v["tok"][:, None], v["pos"], torch.zeros(1, dtype=torch.long), v["state"])
        v["tok"] = logits[:, -1].argmax(-1)
        v["ms"].append((time.perf_counter() - t0) * 1e3)
        v["cpu"].append((time.thread_time() - c0) * 1e3)
        v["pos"] = v["pos"] + 1
        v["toks"].append(int(v["tok"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", type=int, default=2000)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)  # >1 on a shared, busy machine: threads wait on each other
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    model, tok = gw.load_model(args.model)
    ids = prompt_ids(tok, args.prompt)
    variants = {}
    for name, recipe in RECIPES.items():
        cm = gw.compile(model, recipe, tokenizer=tok, verify=False)
        lowerings = {"": cm} if recipe is None else {
            "/slots": CompiledModel(cm.step_graph, tokenizer=tok),
            "/compact": CompiledModel(cm.step_graph, tokenizer=tok, backend=COMPACTING)}
        first, pos, state = prefill(next(iter(lowerings.values())), ids)
        for suffix, low in lowerings.items():
            variants[name + suffix] = {"cm": low, "tok": first, "pos": pos, "state": [t.clone() for t in state],
                                       "ms": [], "cpu": [], "toks": []}
    for _ in range(args.rounds):
        for v in variants.values():
            decode(v, args.steps)
    load1 = os.getloadavg()
    wall = {k: statistics.median(v["ms"]) for k, v in variants.items()}
    med = {k: statistics.median(v["cpu"]) for k, v in variants.items()}
    for k, m in med.items():
        print(f"{k:18} {m:7.1f} CPU ms/token ({m / med['dense']:.2f}x dense)   wall {wall[k]:7.1f} ms")
    for name in ("h2o", "streaming"):
        a, b = variants[f"{name}/slots"], variants[f"{name}/compact"]
        kept = int((a["state"][[s.name for s in a["cm"].step_graph.state].index("key_positions0")] >= 0).sum())
        print(f"{name}: slots {med[name + '/compact'] / med[name + '/slots']:.2f}x faster than compacting; "
              f"same tokens: {a['toks'] == b['toks']}; layer-0 kept slots (all heads): {kept}")
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} (threads {args.threads})")
    if max(load0[0], load1[0]) > (os.cpu_count() or 1):
        print(f"WARNING: the machine was busy (load average above its {os.cpu_count()} cores): absolute ms are inflated "
              "and noisy; compare the ratios")


if __name__ == "__main__":
    main()
