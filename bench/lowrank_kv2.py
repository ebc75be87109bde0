"""lowrank_kv (LoRC) quality on a model with two KV heads: ΔPPL per keep, schedule and scaling.

Usage: python bench/lowrank_kv2.py --model results/kv2-model --out results/lowrank_kv2.json \
           --md results/lowrank_kv2.md
``--model`` is a local Hugging Face folder, e.g. the one ``bench/train_kv2_model.py`` writes
(Qwen2 shape, 2 KV heads, byte vocabulary); a folder without tokenizer files is read with
``graphwright.eval.bytetok.ByteTokenizer``. Perplexity is scored on the first ``--tokens`` tokens
of the held-out part of the shipped novel (``graphwright.eval.data.split_point``: the model was
trained on the part before it), windows of ``--window`` with stride ``--stride``, for the dense
identity graph and every (keep, schedule, scaling) of ``lowrank_kv``. The pass context is the
one ``graphwright.compile`` builds (``passes.pipeline.make_context``: activation scaling
calibrates on the same 200 tokens). keep=1.0 is the exact setting: the script asserts its
perplexity equals dense within 1e-4 relative (the exact-pass logit tolerance). The model is
captured once; every configuration rewrites a copy of the same step graph.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import graphwright as gw
from graphwright.compiled import CompiledModel
from graphwright.eval.bytetok import ByteTokenizer
from graphwright.eval.data import read_text, split_point
from graphwright.eval.perplexity import encode_text, perplexity
from graphwright.passes.lowrank_kv import LowRankKV
from graphwright.passes.pipeline import make_context

EXACT_RTOL = 1e-4


def heldout_tokens(tok, n: int) -> torch.Tensor:
    text = read_text()
    ids = encode_text(tok, text[split_point(text):], n)
    if ids.shape[1] < n:
        raise SystemExit(f"--tokens {n} exceeds the held-out part of the novel ({ids.shape[1]} tokens)")
    return ids


def unigram_ppl(tok, vocab: int, ids: torch.Tensor) -> float:
    """Perplexity of add-one-smoothed token frequencies of the part before the split on ``ids[0, 1:]``
    (the tokens ``perplexity`` scores with stride < window): the floor a trained model must beat."""
    text = read_text()
    train = torch.tensor(tok(text[:split_point(text)], add_special_tokens=False).input_ids, dtype=torch.long)
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    return math.exp(-(counts / counts.sum()).log()[ids[0, 1:]].mean().item())


def markdown(result: dict) -> str:
    """Rows: keep; columns: schedule x scaling; cells: PPL (Δ%)."""
    cols = [(s, c) for c in result["scalings"] for s in result["schedules"]]
    by = {(r["keep"], r["schedule"], r["scaling"]): r for r in result["rows"]}
    base = result["dense_ppl"]
    lines = [f"lowrank_kv on {result['model']} ({result['shape']}); dense PPL {base:.3f} (unigram "
             f"{result['unigram_ppl']:.3f}) over {result['tokens']} held-out tokens (window {result['window']}, "
             f"stride {result['stride']}); cells: PPL (ΔPPL %)", "",
             "| keep | " + " | ".join(f"{s}, scaling={c}" for s, c in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for keep in result["keeps"]:
        cells = []
        for s, c in cols:
            r = by.get((keep, s, c))
            cells.append("-" if r is None else f"{r['ppl']:.3f} ({100 * r['delta_ppl'] / base:+.1f}%)")
        lines.append(f"| {keep:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shape_of(model) -> str:
    c = model.config
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (f"{type(c).__name__.removesuffix('Config')}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"{c.num_attention_heads} query / {kv} KV heads x {hd}, vocab {c.vocab_size}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF folder (bench/train_kv2_model.py output) or a built-in name")
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.5, 0.4])
    p.add_argument("--schedules", nargs="+", default=["progressive", "uniform"], choices=["progressive", "uniform"])
    p.add_argument("--scalings", nargs="+", default=["activation", "none"], choices=["activation", "none"])
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored")
    p.add_argument("--window", type=int, default=256,
                   help="perplexity window: at most the model's training length (train_kv2_model.py --seq, 256)")
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--out", default="results/lowrank_kv2.json")
    p.add_argument("--md", default="results/lowrank_kv2.md")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = gw.load_model(args.model)
    tok = tok if tok is not None else ByteTokenizer()
    sg = gw.capture(model)
    ctx = make_context(model, tok)
    ids = heldout_tokens(tok, args.tokens)
    ppl_kw = dict(input_ids=ids, max_tokens=args.tokens, window=args.window, stride=args.stride, progress=False)
    base = perplexity(CompiledModel(sg, tokenizer=tok), **ppl_kw)
    uni = unigram_ppl(tok, model.config.vocab_size, ids)
    print(f"dense: ppl {base['ppl']:.4f} (unigram {uni:.4f}) over {base['tokens']} tokens "
          f"({time.perf_counter() - t0:.0f} s so far)", flush=True)

    rows = []
    for scaling in args.scalings:
        for schedule in args.schedules:
            for keep in args.keeps:
                t1 = time.perf_counter()
                new = LowRankKV(keep=keep, schedule=schedule, scaling=scaling).run(sg.copy(), ctx)
                res = perplexity(CompiledModel(new, tokenizer=tok), **ppl_kw)
                notes = new.notes["lowrank_kv"]
                row = {"keep": keep, "schedule": schedule, "scaling": scaling,
                       "realised_keep": notes["settings"]["realised_keep"], "ppl": res["ppl"],
                       "delta_ppl": res["ppl"] - base["ppl"],
                       "r_k": [v["r_k"] for v in notes["per_layer"].values()],
                       "r_v": [v["r_v"] for v in notes["per_layer"].values()],
                       "seconds": time.perf_counter() - t1}
                rows.append(row)
                print(f"{scaling:>10} {schedule:>11} keep={keep:.2f}: ppl {row['ppl']:.4f} (Δ {row['delta_ppl']:+.4f}), "
                      f"r_k {row['r_k']}, r_v {row['r_v']}", flush=True)
                if keep >= 1.0 and abs(row["delta_ppl"]) > EXACT_RTOL * base["ppl"]:
                    raise AssertionError(f"lowrank_kv(keep=1.0, schedule={schedule}, scaling={scaling}) is the exact setting "
                                         f"but changed perplexity by {row['delta_ppl']:+.6f} (dense {base['ppl']:.6f})")

    result = {"model": str(args.model), "shape": shape_of(model), "tokens": base["tokens"], "window": args.window,
              "stride": args.stride, "text": "held-out part of the shipped novel (after split_point)",
              "dense_ppl": base["ppl"], "unigram_ppl": uni, "keeps": args.keeps, "schedules": args.schedules, "scalings": args.scalings,
              "rows": rows, "threads": args.threads, "seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table)
    print()
    print(table)
    print(f"wrote {out}" + (f" and {args.md}" if args.md else ""))
    return result


if __name__ == "__main__":
    main()
