"""KVzip prefill cost: CPU seconds of cm.prefill on one needle context, dense vs evict(score='kvzip', budget=0.5), alternating.

Usage: OMP_NUM_THREADS=1 python bench/kvzip_prefill_cost.py   (reads bench/results/kvpress/cases.json, case L1024-c0)
Reports time.process_time per prefill (min of 2) and the ratio; session 14 (loaded machine): 3.13 s vs 21.82 s, 7.0x.
"""

import json
import time

import torch

import graphwright as gw

cases = json.load(open("bench/results/kvpress/cases.json"))
c = next(c for c in cases if c["id"] == "L1024-c0")
ids = torch.tensor([c["ids"][:c["split"]]])
dense = gw.compile("smollm2-135m", verify=False)
kvz = gw.compile("smollm2-135m", recipe="evict(score='kvzip', budget=0.5)", verify=False)
res = {"dense": [], "kvzip": [], "replay_cpu": []}
for _ in range(2):
    for name, cm in (("dense", dense), ("kvzip", kvz)):
        t = time.process_time()
        cm.prefill(ids)
        res[name].append(time.process_time() - t)
        if name == "kvzip":
            res["replay_cpu"].append(cm.last_stats["kvzip"])
print(ids.shape, {k: v for k, v in res.items()})
med = {k: min(v) for k, v in res.items() if k != "replay_cpu"}
print("min CPU s per prefill:", med, "kvzip/dense:", med["kvzip"] / med["dense"])
