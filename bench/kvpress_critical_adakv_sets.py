"""kvpress ``CriticalAdaKVPress`` and graphwright's CriticalAdaKV (``ops/adakv_critical.py``) keep the same sets.

Both sides get the same random base scores (window scored max + 1, as kvpress's SnapKV pads it), values and o_proj
weights: kvpress's own ``compress`` runs in its environment (a stub scorer returns the scores; a stub module carries
the config and ``o_proj``), graphwright's ``critical_adaptive_keep`` here with its base score replaced by the same
scores. The kept (layer, head, position) sets are compared trial by trial.

Usage (from the repository root):
    bench/.venv-kvpress/bin/python bench/kvpress_critical_adakv_sets.py kvpress --dir /tmp/crit   # kvpress's sets
    PYTHONPATH=. python bench/kvpress_critical_adakv_sets.py compare --dir /tmp/crit                # graphwright's, compared
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TRIALS = [  # (S, Hk, g, D, hidden, window, fraction kept)
    (256, 3, 3, 16, 48, 32, 0.25), (256, 3, 3, 16, 48, 32, 0.5), (512, 2, 4, 8, 32, 32, 0.25),
    (300, 4, 2, 8, 24, 16, 0.3), (1024, 3, 3, 64, 576, 32, 0.25), (1024, 3, 3, 64, 576, 32, 0.5),
]


def inputs(trial: int):
    S, hk, g, D, hidden, w, frac = TRIALS[trial]
    gen = torch.Generator().manual_seed(100 + trial)
    base = torch.rand(1, hk, S - w, generator=gen) ** 4 * torch.rand(1, hk, 1, generator=gen)  # dispersed heads
    v = torch.randn(1, hk, S, D, generator=gen) * torch.rand(1, hk, S, 1, generator=gen).add(0.2)
    wo = torch.randn(hidden, hk * g * D, generator=gen) / (hk * g * D) ** 0.5
    return S, hk, g, D, hidden, w, frac, base, v, wo


def run_kvpress(out: Path) -> None:
    from types import SimpleNamespace

    import torch.nn.functional as F
    from kvpress.presses.criticalkv_press import CriticalAdaKVPress
    from kvpress.presses.scorer_press import ScorerPress

    class Given(ScorerPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            return F.pad(self.base.clone(), (0, self.window), value=self.base.max().item() + 1)  # SnapKV's window pad

    res = []
    for t in range(len(TRIALS)):
        S, hk, g, D, hidden, w, frac, base, v, wo = inputs(t)
        press = Given(compression_ratio=1 - frac)
        press.base, press.window = base, w
        cfg = SimpleNamespace(num_attention_heads=hk * g, head_dim=D, hidden_size=hidden, _attn_implementation="sdpa")
        module = SimpleNamespace(config=cfg, o_proj=SimpleNamespace(weight=wo), num_key_value_groups=g)
        CriticalAdaKVPress(press=press).compress(module, None, torch.zeros(1, hk, S, D), v, None, {})
        _, h, s = module.masked_key_indices
        res.append({"masked": sorted(zip(h.tolist(), s.tolist()))})
    out.mkdir(parents=True, exist_ok=True)
    (out / "kvpress_sets.json").write_text(json.dumps(res))
    print(f"kvpress: {len(res)} trials -> {out / 'kvpress_sets.json'}")


def graphwright_keep(t: int) -> torch.Tensor:
    from graphwright.ops import adakv_critical
    from graphwright.ops.scorers.base import ScoreInputs

    S, hk, g, D, hidden, w, frac, base, v, wo = inputs(t)
    pos = torch.arange(S).expand(1, hk, S)
    protected = pos >= S - w
    scores = torch.nn.functional.pad(base, (0, w))
    x = ScoreInputs(q=torch.zeros(1, hk * g, S, D), k=torch.zeros(1, hk, S, D), v=v, q_pos=torch.arange(S)[None], k_pos=pos,
                    scale=1.0, cand=~protected, length=torch.tensor([S]), window=w, eps=1e-4, wo=wo, first=0.5)
    n_kept = int(S * frac)  # kvpress compute_n_kept: int(S * (1 - ratio))
    saved = adakv_critical.snapkv_score
    adakv_critical.snapkv_score = lambda _x: scores * w  # graphwright divides its base by the window
    try:
        return adakv_critical.critical_adaptive_keep(x, torch.tensor([n_kept]), protected, 0.2)[0]
    finally:
        adakv_critical.snapkv_score = saved


def compare(out: Path) -> int:
    kv = json.loads((out / "kvpress_sets.json").read_text())
    same = 0
    for t, r in enumerate(kv):
        keep = graphwright_keep(t)
        masked = torch.zeros_like(keep)
        for h, s in r["masked"]:
            masked[h, s] = True
        ok = torch.equal(keep, ~masked)
        same += ok
        print(f"trial {t} {TRIALS[t]}: per-head kept graphwright {keep.sum(-1).tolist()} kvpress {(~masked).sum(-1).tolist()}; "
              f"entries kept by one side only: {int((keep ^ ~masked).sum())}; identical: {ok}")
    print(f"identical kept sets: {same} of {len(kv)}")
    return 0 if same == len(kv) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("side", choices=("kvpress", "compare"))
    p.add_argument("--dir", default="/tmp/kvpress_critical_adakv")
    a = p.parse_args(argv)
    if a.side == "kvpress":
        run_kvpress(Path(a.dir))
        return 0
    return compare(Path(a.dir))


if __name__ == "__main__":
    raise SystemExit(main())
