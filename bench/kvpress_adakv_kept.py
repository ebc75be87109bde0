"""Why kvpress's ``AdaKV(SnapKV)`` and graphwright's ``snapkv(heads='adaptive')`` part: the kept sets per layer and head.

Three steps (each side in its own environment; the files pass through ``--dir``):

    bench/.venv-kvpress/bin/python bench/kvpress_adakv_kept.py kvpress --case L1024-c40 --budget 0.25
    python bench/kvpress_adakv_kept.py graphwright --case L1024-c40 --budget 0.25
    python bench/kvpress_adakv_kept.py compare --case L1024-c40 --budget 0.25

``kvpress`` runs the compression forward pass of kvpress's ``AdaKVPress(SnapKVPress(window 32, kernel 5))`` on the
case's token ids (``OUT/cases.json``) and saves, per layer, SnapKV's pooled scores [Hk, S] (the press's own ``score``)
and the kept set (every position not in ``masked_key_indices``). ``graphwright`` runs ``snapkv(budget=B,
heads='adaptive')``'s prefill and saves, per layer, the pooled scores its Ada-KV split sees (``adakv_ref.adaptive_counts``)
and the kept set (``adakv_ref.adakv_keep``). ``compare`` prints, per layer, how many positions the two sides keep
differently and how far their per-head counts are apart, and re-derives each side's kept set from the other side's
scores with the other rule (``ffy0_keep``: the official AdaKV safeguard, graphwright's; ``kvpress_keep``: kvpress's):
when both re-derivations are exact, the scores agree and the split rule alone explains the difference.

``--answer-rule kvpress`` (graphwright step): generate the case's answer with graphwright's packed cache but
kvpress's split rule (``adaptive_counts`` replaced by ``kvpress_counts``): if it equals kvpress's answer, masking vs
packing plays no part. Diagnostic only; nothing here is part of graphwright.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WINDOW, KERNEL, ALPHA = 32, 5, 0.2


def ffy0_counts(scores: torch.Tensor, cand: torch.Tensor, c: int, floor: float) -> list[int]:
    """The official AdaKV split (FFY0/AdaKV ``AdaptiveSnapKVCluster``, ALGORITHMS-2 section 3): global top-(Hk*c) of the
    prefix scores, then n_h <- round((1 - floor) * n_h + floor * c). Written here from the spec (not graphwright's code)."""
    hk, S = scores.shape
    flat = scores.float().masked_fill(~cand, float("-inf")).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:hk * c]
    n = torch.bincount(order // S, minlength=hk).tolist()
    return [min(int(cand[h].sum()), math.floor((1.0 - floor) * n[h] + floor * c + 0.5)) for h in range(hk)]


def kvpress_counts(scores: torch.Tensor, cand: torch.Tensor, c: int, floor: float, window: int = WINDOW) -> list[int]:
    """kvpress ``AdaKVPress``'s split in prefix terms: graphwright's ``adakv_ref.kvpress_counts`` (every head keeps
    n_kept = c + window tokens in all; its top int(floor * n_kept) are forced, the window first, then the rest of the
    layer's Hk * n_kept goes to the global top of what is left), with this script's window as the default. Imported
    here, not at the top: the kvpress environment that runs ``kvpress`` mode has no graphwright."""
    from graphwright.ops.adakv_ref import kvpress_counts as library_counts

    return library_counts(scores, cand, c, floor, window)


def keep_from_counts(scores: torch.Tensor, cand: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[Hk, S] bool: each head's top-counts[h] candidates (ties: earlier position)."""
    s = scores.float().masked_fill(~cand, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(cand)
    for h, n in enumerate(counts):
        keep[h, order[h, :n]] = True
    return keep & cand


def load_case(out: Path, case_id: str) -> dict:
    cases = json.loads((out / "cases.json").read_text())
    for c in cases:
        if c["id"] == case_id:
            return c
    raise SystemExit(f"no case {case_id!r} in {out / 'cases.json'}; known: {', '.join(c['id'] for c in cases[:5])}, ...")


def run_kvpress(a) -> None:
    import kvpress as kp
    from kvpress_worker import SNAPKV_WINDOW, _load, answer

    assert SNAPKV_WINDOW == WINDOW
    case = load_case(Path(a.out), a.case)
    model = _load(str(HERE / ".cache-kvpress" / a.model), "sdpa")
    press = kp.AdaKVPress(kp.SnapKVPress(compression_ratio=1.0 - a.budget, window_size=WINDOW, kernel_size=KERNEL))
    scores = []
    score = press.press.score

    def keep_scores(*args, **kw):
        s = score(*args, **kw)
        scores.append(s[0].detach().clone())  # [Hk, S]: prefix pooled scores, the window padded with max + 1
        return s

    press.press.score = keep_scores
    new, _, _ = answer(model, press, case["ids"], len(case["ids"]), 16, {2})
    keeps = []
    for layer in model.model.layers:
        b, h, s = layer.self_attn.masked_key_indices
        keep = torch.ones(scores[0].shape, dtype=torch.bool)
        keep[h[b == 0], s[b == 0]] = False
        keeps.append(keep)
    torch.save({"scores": scores, "keep": keeps, "new_ids": new}, Path(a.dir) / f"kvpress_{a.case}_{a.budget}.pt")
    print(f"kvpress answer ids {new}; kept per layer {[int(k.sum()) for k in keeps]}")


def run_graphwright(a) -> None:
    from kvpress_side_by_side import fill, load

    import graphwright.ops.adakv_ref as ref
    from graphwright.capture import capture
    from graphwright.compiled import CompiledModel
    from graphwright.verify import run_recipe

    case = load_case(Path(a.out), a.case)
    model, tok = load(a.model)
    recipe = fill("snapkv(budget={budget}, heads='adaptive')", a.budget, len(case["ids"]))
    sg = capture(model)
    new, parsed, _ = run_recipe(sg, recipe, model=model, tokenizer=tok, verify=False)
    cm = CompiledModel(new, tokenizer=tok, recipe=parsed)
    rec = {"scores": [], "keep": []}
    counts, keep = ref.adaptive_counts, ref.adakv_keep

    def rec_counts(scores, cand, c, floor):
        rec["scores"].append(scores.detach().clone())
        rule = kvpress_counts if a.answer_rule == "kvpress" else counts
        return rule(scores, cand, c, floor)

    def rec_keep(*args, **kw):
        out = keep(*args, **kw)
        rec["keep"].append(out[0].detach().clone())
        return out

    ref.adaptive_counts, ref.adakv_keep = rec_counts, rec_keep
    try:
        ids = torch.tensor([case["ids"]])
        out = cm.generate(ids, max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, allow_long=True)
    finally:
        ref.adaptive_counts, ref.adakv_keep = counts, keep
    rec["new_ids"] = out[0, ids.shape[1]:].tolist()
    rec["recipe"], rec["rule"] = recipe, a.answer_rule
    torch.save(rec, Path(a.dir) / f"graphwright_{a.case}_{a.budget}_{a.answer_rule}.pt")
    print(f"graphwright {recipe} (split rule {a.answer_rule}) answer ids {rec['new_ids']}: {tok.decode(rec['new_ids'])!r}")


def compare(a) -> None:
    kv = torch.load(Path(a.dir) / f"kvpress_{a.case}_{a.budget}.pt")
    gw = torch.load(Path(a.dir) / f"graphwright_{a.case}_{a.budget}_ffy0.pt")
    S = kv["keep"][0].shape[-1]
    n = len(kv["keep"])
    budget = round(a.budget * S)
    c = budget - WINDOW
    tot_diff, max_score_gap, rows = 0, 0.0, []
    re_gw_ok = re_kv_ok = 0
    for layer in range(n):
        kk, gk = kv["keep"][layer], gw["keep"][layer]
        cand = torch.zeros_like(kk)
        cand[:, :S - WINDOW] = True
        ks = kv["scores"][layer][:, :S - WINDOW]
        gs = gw["scores"][layer][:, :S - WINDOW]
        # graphwright sums the window's softmax rows (ALGORITHMS-2: "scores summed over window queries"), kvpress
        # averages them: a factor of WINDOW for every head, so neither ranking nor the global top-k changes
        max_score_gap = max(max_score_gap, float(((ks * WINDOW - gs).abs() / gs.abs().amax()).max()))
        kcount = kk[:, :S - WINDOW].sum(-1).tolist()
        gcount = gk[:, :S - WINDOW].sum(-1).tolist()
        diff = int((kk ^ gk).sum())
        tot_diff += diff
        # each side's kept set re-derived from the OTHER side's scores with its own rule
        full = torch.zeros_like(kk)
        full[:, :S - WINDOW] = True
        sc = torch.zeros(kk.shape)
        sc[:, :S - WINDOW] = gs
        re_kv = keep_from_counts(sc, full, kvpress_counts(sc, full, c, ALPHA)) | ~full
        sc[:, :S - WINDOW] = ks
        re_gw = keep_from_counts(sc, full, ffy0_counts(sc, full, c, ALPHA)) | ~full
        re_kv_ok += bool(torch.equal(re_kv, kk))
        re_gw_ok += bool(torch.equal(re_gw, gk))
        rows.append((layer, kcount, gcount, diff))
    print(f"case {a.case}, budget {a.budget} ({budget} tokens per head, window {WINDOW}, prefix budget C = {c}), {n} layers")
    print(f"max |{WINDOW} x kvpress score - graphwright score| / max graphwright score (all layers, heads, prefix "
          f"positions): {max_score_gap:.3g}")
    print(f"positions kept by one side only: {tot_diff} of {n * kv['keep'][0].numel()} (layer x head x position)")
    print(f"kvpress's kept sets = kvpress's rule on graphwright's scores: {re_kv_ok} of {n} layers; graphwright's kept "
          f"sets = the official rule on kvpress's scores: {re_gw_ok} of {n} layers")
    print("layer: prefix tokens kept per KV head, kvpress | graphwright (positions differing)")
    for layer, kc, gc, d in rows:
        print(f"  {layer:2d}: {kc} | {gc} ({d})")
    print(f"min prefix tokens of a head: kvpress {min(min(r[1]) for r in rows)}, graphwright {min(min(r[2]) for r in rows)}; "
          f"max: kvpress {max(max(r[1]) for r in rows)}, graphwright {max(max(r[2]) for r in rows)}")
    print(f"answers: kvpress {kv['new_ids']}, graphwright {gw['new_ids']}")
    alt = Path(a.dir) / f"graphwright_{a.case}_{a.budget}_kvpress.pt"
    if alt.is_file():
        g2 = torch.load(alt)
        same = sum(bool(torch.equal(x, y)) for x, y in zip(g2["keep"], kv["keep"]))
        print(f"graphwright packed cache with kvpress's split rule: kept sets equal kvpress's in {same} of {n} layers; "
              f"answer {g2['new_ids']} ({'=' if g2['new_ids'] == kv['new_ids'] else '!='} kvpress's)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("side", choices=("kvpress", "graphwright", "compare"))
    p.add_argument("--case", default="L1024-c40")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=str(HERE / "results" / "kvpress"), help="folder holding cases.json")
    p.add_argument("--dir", default="/tmp", help="where the kept sets are written and read")
    p.add_argument("--answer-rule", default="ffy0", choices=("ffy0", "kvpress"),
                   help="graphwright step: the split rule its packed cache uses (ffy0 = graphwright's own)")
    a = p.parse_args(argv)
    {"kvpress": run_kvpress, "graphwright": run_graphwright, "compare": compare}[a.side](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
