"""KVzip side by side at the score level: kvpress ``KVzipPress``'s ``score_val`` vs graphwright's replay scores.

Three steps (each side in its own environment; files pass through ``--dir``):

    bench/.venv-kvpress/bin/python bench/kvpress_kvzip_scores.py kvpress --cases L1024-c0 --budget 0.25 --dir /tmp/kvz
    python bench/kvpress_kvzip_scores.py graphwright --cases L1024-c0 --budget 0.25 --dir /tmp/kvz
    python bench/kvpress_kvzip_scores.py compare --cases L1024-c0 --budget 0.25 --dir /tmp/kvz

Both sides score the case's context alone (``split`` of ``OUT/cases.json``, question-agnostic). ``kvpress`` wraps the
press's ``compress_post`` and saves its ``score_val`` [L, Hk, n] before the sinks are overwritten, and the pruned
(layer, head, position) entries it masks; ``graphwright`` runs ``evict(score='kvzip', budget=B)``'s replay
(``KVzipReplay.row_scores``) and its ``keep_sets``. ``compare`` prints the largest score difference, the replay lengths
and how many (layer, head, position) entries one side keeps and the other prunes. Diagnostic only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def load_case(out: Path, case_id: str) -> dict:
    for c in json.loads((out / "cases.json").read_text()):
        if c["id"] == case_id:
            return c
    raise SystemExit(f"no case {case_id!r} in {out / 'cases.json'}")


def run_kvpress(a) -> None:
    import kvpress as kp
    from kvpress_worker import _load
    from transformers import DynamicCache

    spec_dir = HERE / ".cache-kvpress" / a.model
    model = _load(str(spec_dir), "sdpa")
    for case_id in a.cases:
        case = load_case(Path(a.out), case_id)
        press = kp.KVzipPress(compression_ratio=1.0 - a.budget)
        got = {}
        original = press.compress_post

        def capture(model_, press=press, original=original, got=got):
            got["scores"] = press.score_val[:, 0].float().clone()  # [L, Hk, n] before the sinks get max + 1
            got["prefix"] = int(press.prefix_length)  # the chat template's prefix (reset when the press exits)
            original(model_)
            pruned = torch.zeros_like(got["scores"], dtype=torch.bool)
            for i, layer in enumerate(model_.model.layers):
                _, h, s = layer.self_attn.masked_key_indices
                pruned[i, h, s] = True
            got["kept"] = ~pruned

        press.compress_post = capture
        ctx = torch.tensor([case["ids"][:case["split"]]])
        with torch.inference_mode(), press(model):
            model(input_ids=ctx, past_key_values=DynamicCache(), logits_to_keep=1)
        torch.save(got, Path(a.dir) / f"kvpress_{case_id}_{a.budget}.pt")
        print(f"kvpress {case_id}: kept {int(got['kept'].sum())} of {got['kept'].numel()}")


def run_graphwright(a) -> None:
    import graphwright as gw
    from graphwright.ops.scorers.kvzip import keep_sets

    cm = gw.compile(a.model, recipe=f"evict(score='kvzip', budget={a.budget})", verify=False)
    replay = cm._runtime.after_prompt
    s = replay.notes["settings"]
    for case_id in a.cases:
        case = load_case(Path(a.out), case_id)
        ids = torch.tensor([case["ids"][:case["split"]]])
        rt = cm._runtime
        with torch.inference_mode():
            state = rt.step(ids, torch.arange(ids.shape[1])[None], torch.tensor([ids.shape[1] - 1]),
                            [sp.empty(1, ids.device) for sp in rt.specs])[1]
            scores, count = replay.row_scores(state, ids[0].tolist(), ids.shape[1])
        stacked = torch.stack([scores[layer] for layer in replay.layers])
        kept = torch.stack(keep_sets([scores[layer] for layer in replay.layers], s["sinks"], s["budget_n"], s["budget_f"],
                                     s["layerwise"]))
        torch.save({"scores": stacked, "kept": kept, "replay_tokens": count, "prefix": replay.notes["replay"]["prefix"]},
                   Path(a.dir) / f"graphwright_{case_id}_{a.budget}.pt")
        print(f"graphwright {case_id}: kept {int(kept.sum())} of {kept.numel()}, replay tokens {count}")


def compare(a) -> None:
    for case_id in a.cases:
        kv = torch.load(Path(a.dir) / f"kvpress_{case_id}_{a.budget}.pt")
        gw_ = torch.load(Path(a.dir) / f"graphwright_{case_id}_{a.budget}.pt")
        ks, gs = kv["scores"], gw_["scores"]
        if ks.shape != gs.shape:
            print(f"{case_id}: shapes differ, kvpress {tuple(ks.shape)} graphwright {tuple(gs.shape)}")
            continue
        diff = (ks - gs).abs()
        scored = gs > 0
        only_kv = int((kv["kept"] & ~gw_["kept"]).sum())
        only_gw = int((gw_["kept"] & ~kv["kept"]).sum())
        print(f"{case_id} @ {a.budget}: scores [L, Hk, n] = {tuple(gs.shape)}, prefix (unscored) kvpress "
              f"{kv['prefix']} / graphwright {gw_['prefix']}; max |diff| {float(diff.max()):.3g}, max relative "
              f"{float((diff[scored] / gs[scored]).max()):.3g}; kept kvpress {int(kv['kept'].sum())} / graphwright "
              f"{int(gw_['kept'].sum())}; kept by one side only: kvpress {only_kv}, graphwright {only_gw}; "
              f"layers with identical sets {sum(bool(torch.equal(x, y)) for x, y in zip(kv['kept'], gw_['kept']))} "
              f"of {gs.shape[0]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("side", choices=("kvpress", "graphwright", "compare"))
    p.add_argument("--cases", nargs="+", required=True)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=str(HERE / "results" / "kvpress"), help="the folder holding cases.json")
    p.add_argument("--dir", required=True, help="where the score files go")
    a = p.parse_args(argv)
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    {"kvpress": run_kvpress, "graphwright": run_graphwright, "compare": compare}[a.side](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
