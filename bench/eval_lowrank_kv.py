"""Quality of lowrank_kv (LoRC) on a real model: ΔPPL vs dense and greedy agreement, per budget.

Usage: python bench/eval_lowrank_kv.py --keeps 0.8 0.6 0.5 0.4 --schedules progressive uniform \
           --tokens 2048 --out results/lowrank_kv.json --plot results/lowrank_kv.png

Perplexity: the first ``--tokens`` tokens of the shipped Jane Austen novel, non-overlapping
``--window``-token windows (stride = window), scored with ``graphwright.eval.perplexity`` for the
dense identity graph and every (schedule, keep). Greedy agreement: ``--prompts`` prompts of
``--prompt-len`` tokens cut from later in the novel, ``--new`` greedy tokens each (EOS ignored),
fraction of generated positions where the compressed model emits the dense model's token.
The model is captured once; every configuration rewrites a copy of the same step graph.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import graphwright as gw
from graphwright.compiled import CompiledModel
from graphwright.eval.data import read_text
from graphwright.eval.perplexity import encode_text, perplexity
from graphwright.passes.base import PassContext
from graphwright.passes.lowrank_kv import LowRankKV


def greedy_prompts(tok, n: int, length: int, skip: int) -> torch.Tensor:
    """[n, length] prompts from the novel, starting after the ``skip`` tokens used for perplexity."""
    ids = encode_text(tok, read_text(), skip + n * length * 4)[0]
    starts = torch.linspace(skip, ids.numel() - length, n).long()
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def agreement(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> dict:
    new_a, new_b = a[:, prompt_len:], b[:, prompt_len:]
    same = new_a == new_b
    # tokens until the first disagreement, per prompt (after it the contexts differ)
    prefix = torch.where(same.all(1), same.shape[1], (~same).float().argmax(1)).float()
    return {"token_agreement": same.float().mean().item(), "mean_prefix_match": prefix.mean().item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.5, 0.4])
    p.add_argument("--schedules", nargs="+", default=["progressive", "uniform"], choices=["progressive", "uniform"])
    p.add_argument("--value-path", default="absorbed", choices=["absorbed", "reconstruct"])
    p.add_argument("--tokens", type=int, default=2048, help="tokens of text scored for perplexity")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--out", default="results/lowrank_kv.json")
    p.add_argument("--plot", default="results/lowrank_kv.png")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared, oversubscribed machine one thread was 3-4x faster)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = gw.load_model(args.model)
    sg = gw.capture(model)
    dense = CompiledModel(sg, tokenizer=tok)
    ids = encode_text(tok, read_text(), args.tokens)
    ppl_kw = dict(input_ids=ids, max_tokens=args.tokens, window=args.window, stride=args.window, progress=False)
    base = perplexity(dense, **ppl_kw)
    prompts = greedy_prompts(tok, args.prompts, args.prompt_len, args.tokens)
    ref = dense.generate(prompts, args.new, eos_token_id=[])
    print(f"dense: ppl {base['ppl']:.3f} over {base['tokens']} tokens ({time.perf_counter() - t0:.0f} s so far)")

    rows = []
    for schedule in args.schedules:
        for keep in args.keeps:
            t1 = time.perf_counter()
            pas = LowRankKV(keep=keep, schedule=schedule, value_path=args.value_path)
            new = pas.run(sg.copy(), PassContext(model=model, tokenizer=tok))
            cm = CompiledModel(new, tokenizer=tok)
            res = perplexity(cm, **ppl_kw)
            out = cm.generate(prompts, args.new, eos_token_id=[])
            notes = new.notes["lowrank_kv"]
            row = {"schedule": schedule, "keep": keep, "realised_keep": notes["settings"]["realised_keep"],
                   "kv_fraction": cm.last_stats["kv_fraction"], "ppl": res["ppl"], "delta_ppl": res["ppl"] - base["ppl"],
                   **agreement(ref, out, prompts.shape[1]),
                   "r_k": [v["r_k"] for v in notes["per_layer"].values()],
                   "r_v": [v["r_v"] for v in notes["per_layer"].values()],
                   "seconds": time.perf_counter() - t1}
            rows.append(row)
            print(f"{schedule:>11} keep={keep:.2f}: ppl {row['ppl']:.3f} (Δ {row['delta_ppl']:+.3f}), "
                  f"agreement {row['token_agreement']:.3f}, {row['seconds']:.0f} s", flush=True)

    print()
    print(f"{'schedule':>11} {'keep':>5} {'realised':>8} {'PPL':>8} {'ΔPPL':>8} {'agree':>6} {'prefix':>6}  r_k first→last")
    print(f"{'dense':>11} {1.0:5.2f} {1.0:8.4f} {base['ppl']:8.3f} {0.0:+8.3f} {1.0:6.3f} {args.new:6.1f}")
    for r in rows:
        print(f"{r['schedule']:>11} {r['keep']:5.2f} {r['realised_keep']:8.4f} {r['ppl']:8.3f} {r['delta_ppl']:+8.3f} "
              f"{r['token_agreement']:6.3f} {r['mean_prefix_match']:6.1f}  {r['r_k'][0]}→{r['r_k'][-1]}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "tokens": base["tokens"], "window": args.window,
                               "value_path": args.value_path, "prompts": args.prompts, "new_tokens": args.new,
                               "dense_ppl": base["ppl"], "rows": rows, "seconds": time.perf_counter() - t0}, indent=2))
    if args.plot:
        from graphwright.eval.plot import plot_sweep

        plot_sweep(rows, x="keep", y="delta_ppl", group="schedule", path=args.plot,
                   title=f"lowrank_kv on {args.model}: ΔPPL vs dense ({base['tokens']} tokens)")
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
