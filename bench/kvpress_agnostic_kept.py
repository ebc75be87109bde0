"""Why question-agnostic kvpress presses and their graphwright twins parted (session 12): the kept sets per layer and head.

Three steps (each side in its own environment; the files pass through ``--dir``):

    bench/.venv-kvpress/bin/python bench/kvpress_agnostic_kept.py kvpress --jobs TOVA:0.5:L1024-c40 SnapKV:0.25:L1024-c30
    python bench/kvpress_agnostic_kept.py graphwright --jobs TOVA:0.5:L1024-c40 SnapKV:0.25:L1024-c30
    python bench/kvpress_agnostic_kept.py compare --jobs TOVA:0.5:L1024-c40 SnapKV:0.25:L1024-c30

A job is ``PRESS:BUDGET:CASE`` (a press of ``bench/kvpress_worker.py`` with a graphwright twin in ``TWINS``). Both sides
compress the case's context alone (``split`` of ``OUT/cases.json``) and then answer its question, as the side-by-side's
agnostic mode does. ``kvpress`` wraps the press's ``compress`` and recovers each kept key's position by exact match
against the keys it was given (gather copies them bit for bit; RoPE makes every position's key distinct), per layer and
KV head. ``graphwright`` runs the twin twice, its ``{budget}`` filled from the whole prompt (sessions 9-12, ``prompt``)
and from the context (``context``, kvpress's basis: ``kvpress_side_by_side.budget_tokens``), and reads the kept
positions from the context's ``key_positions<layer>`` state. ``compare`` prints, per job and basis, the kept tokens
per head (min/max over the layer x head grid), how many (layer, head, position) entries one side keeps and the other
does not, and the three answers. Diagnostic only; nothing here is part of graphwright.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TWINS = {"SnapKV": "snapkv(budget={budget})", "TOVA": "evict(score='tova', when='prefill', budget={budget})",
         "Knorm": "evict(score='knorm', budget={budget})", "KeyDiff": "evict(score='keydiff', budget={budget})",
         "ExpectedAttention": "evict(score='expected_attention', budget={budget})",
         "CriticalKV(SnapKV)": "evict(score='criticalkv', budget={budget})"}
BASES = ("prompt", "context")


def parse_job(text: str) -> tuple:
    try:
        press, budget, case = text.rsplit(":", 2)
        budget = float(budget)
    except ValueError:
        raise SystemExit(f"a job is PRESS:BUDGET:CASE (e.g. TOVA:0.5:L1024-c40); got {text!r}") from None
    if press not in TWINS:
        raise SystemExit(f"press {press!r} has no graphwright twin here; known: {', '.join(TWINS)}")
    return press, budget, case


def stem(job: tuple) -> str:
    press, budget, case = job
    return f"{press.replace('(', '-').replace(')', '')}_{budget}_{case}"


def load_case(out: Path, case_id: str) -> dict:
    for c in json.loads((out / "cases.json").read_text()):
        if c["id"] == case_id:
            return c
    raise SystemExit(f"no case {case_id!r} in {out / 'cases.json'}")


def positions_of(kept: torch.Tensor, given: torch.Tensor) -> list:
    """Per KV head, the sorted positions of ``given`` [Hk, S, D] whose rows ``kept`` [Hk, n, D] holds (exact match)."""
    out = []
    for h in range(given.shape[0]):
        eq = (kept[h][:, None, :] == given[h][None, :, :]).all(-1)  # [n, S]
        if not bool(eq.any(-1).all()):
            raise SystemExit("a kept key matches no given key: the press changed the keys (positions cannot be recovered)")
        out.append(sorted(int(i) for i in eq.float().argmax(-1)))
    return out


def run_kvpress(a, jobs) -> None:
    from kvpress_worker import EAGER, _load, _presses, answer

    factories, models = _presses(), {}
    for job in jobs:
        press_name, budget, case_id = job
        case = load_case(Path(a.out), case_id)
        attn = "eager" if press_name in EAGER else "sdpa"
        if attn not in models:
            models[attn] = _load(str(HERE / ".cache-kvpress" / a.model), attn)
        press = factories[press_name](1.0 - budget)
        keeps, compress = [], press.compress

        def recording(module, hidden_states, keys, values, *rest, _compress=compress, _keeps=keeps):
            k_out, v_out = _compress(module, hidden_states, keys, values, *rest)
            _keeps.append(positions_of(k_out[0], keys[0]))
            return k_out, v_out

        press.compress = recording
        new, _, kept = answer(models[attn], press, case["ids"], case["split"], 16, {2})
        torch.save({"keep": keeps, "new_ids": new, "context": case["split"]}, Path(a.dir) / f"kvpress_{stem(job)}.pt")
        print(f"kvpress {press_name} {budget} {case_id}: kept {kept} of {case['split']} context tokens, answer {new}", flush=True)


def run_graphwright(a, jobs) -> None:
    from kvpress_side_by_side import fill, load

    from graphwright.capture import capture
    from graphwright.compiled import CompiledModel
    from graphwright.verify import run_recipe

    model, tok = load(a.model)
    sg, cms = capture(model), {}
    for job in jobs:
        press_name, budget, case_id = job
        case = load_case(Path(a.out), case_id)
        ids = torch.tensor([case["ids"]])
        for basis in BASES:
            recipe = fill(TWINS[press_name], budget, case["split"] if basis == "context" else len(case["ids"]))
            if recipe not in cms:
                new, parsed, _ = run_recipe(sg, recipe, model=model, tokenizer=tok, verify=False)
                cms[recipe] = CompiledModel(new, tokenizer=tok, recipe=parsed)
            cm = cms[recipe]
            ctx = cm.prefill(ids[:, :case["split"]], allow_long=True)
            keeps = {}
            for t, s in zip(ctx.state, cm._runtime.specs):
                if s.kind == "positions" and s.name.startswith("key_positions") and s.layer is not None:
                    keeps[s.layer] = [sorted(int(p) for p in row[row >= 0]) for row in t[0]]
            if not keeps:
                raise SystemExit(f"{recipe}: the context holds no per-head key_positions state (not an eviction twin?)")
            q = ids[:, case["split"]:]
            out = cm.generate(q, context=ctx, max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                              allow_long=True)
            new_ids = out[0, q.shape[1]:].tolist()
            torch.save({"keep": [keeps[i] for i in sorted(keeps)], "new_ids": new_ids, "recipe": recipe},
                       Path(a.dir) / f"graphwright_{basis}_{stem(job)}.pt")
            print(f"graphwright {recipe} ({basis} basis) {case_id}: answer {new_ids}", flush=True)


def compare(a, jobs) -> None:
    for job in jobs:
        kv = torch.load(Path(a.dir) / f"kvpress_{stem(job)}.pt")
        counts = [len(h) for layer in kv["keep"] for h in layer]
        print(f"{job[0]} at {job[1]} on {job[2]} (context {kv['context']} tokens): kvpress keeps {min(counts)}-{max(counts)} "
              f"per head over {len(kv['keep'])} layers x {len(kv['keep'][0])} KV heads, answer {kv['new_ids']}")
        for basis in BASES:
            gw = torch.load(Path(a.dir) / f"graphwright_{basis}_{stem(job)}.pt")
            g_counts = [len(h) for layer in gw["keep"] for h in layer]
            only_kv = only_gw = same_heads = 0
            parted = []
            for layer, (lk, lg) in enumerate(zip(kv["keep"], gw["keep"])):
                for head, (hk, hg) in enumerate(zip(lk, lg)):
                    sk, sg = set(hk), set(hg)
                    only_kv += len(sk - sg)
                    only_gw += len(sg - sk)
                    same_heads += sk == sg
                    if sk != sg:
                        parted.append(f"L{layer}h{head}:{len(sk - sg)}")
            n_heads = len(counts)
            verdict = "=" if gw["new_ids"] == kv["new_ids"] else "!="
            print(f"  graphwright {gw['recipe']} ({basis} basis): keeps {min(g_counts)}-{max(g_counts)} per head; "
                  f"identical kept sets in {same_heads} of {n_heads} (layer, head); positions kept by kvpress only "
                  f"{only_kv}, by graphwright only {only_gw}; answer {gw['new_ids']} ({verdict} kvpress's)"
                  + (f"; parted (layer, head: positions kvpress only): {' '.join(parted)}" if len(parted) <= 6 else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("side", choices=("kvpress", "graphwright", "compare"))
    p.add_argument("--jobs", nargs="+", required=True, help="PRESS:BUDGET:CASE, e.g. TOVA:0.5:L1024-c40")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=str(HERE / "results" / "kvpress"), help="folder holding cases.json")
    p.add_argument("--dir", default="/tmp", help="where the kept sets are written and read")
    a = p.parse_args(argv)
    jobs = [parse_job(j) for j in a.jobs]
    {"kvpress": run_kvpress, "graphwright": run_graphwright, "compare": compare}[a.side](a, jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
