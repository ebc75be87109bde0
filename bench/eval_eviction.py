"""Quality of KV eviction on a real model: streaming perplexity vs the KV memory really held.

Usage: python bench/eval_eviction.py --tokens 768 --prefix 512 --out results/eviction.json \
           --plot results/eviction.png [--recipes "h2o(heavy=0.25, recent=0.25)" ...]
       python bench/eval_eviction.py --niah --niah-length 1024 --out results/eviction_niah.json \
           --plot results/eviction_niah.png

Needle-in-a-haystack (``--niah``): the seeded needle grid of ``graphwright.eval.niah`` at one
prompt length, several depths and haystacks, answered greedily by each recipe; the memory point is
the KV bytes held at the end of each case over the dense bytes (mean over cases). One length keeps
the token budgets of snapkv/streaming at a known fraction (``NIAH_RECIPES`` are written for 1024).

Protocol: the first ``--tokens`` tokens of the shipped Jane Austen novel form one sequence; the
first ``--prefix`` are one prefill step, every later token is one decode step through the
runtime's own cache threading (as ``generate`` does), so eviction after prefill and at every
decode step is exercised. Perplexity is over the decoded tokens only (the prefill logits are
dense for every post-prefill method and would dilute the difference). Memory: ``kv_fraction`` =
KV state bytes / dense KV bytes at the last step (latent caches and padding counted as
allocated); ``kept_fraction`` = real tokens held / tokens seen, averaged over layers, KV heads and
decode steps. The model is captured once; every recipe rewrites a copy of the same step graph.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import graphwright as gw
from graphwright.capture import capture
from graphwright.compiled import CompiledModel
from graphwright.eval.data import read_text
from graphwright.eval.perplexity import encode_text
from graphwright.runtime.generate import kept_tokens_per_head, state_bytes
from graphwright.runtime.score import token_nll
from graphwright.verify import run_recipe

DEFAULT_RECIPES = [
    "noop",
    "h2o(heavy=0.25, recent=0.25)",
    "snapkv(budget=128)",
    "streaming(sinks=4, window=380)",
    "fastgen(recovery=0.95)",
    "lowrank_kv(keep=0.5)",
    "lowrank_kv(keep=0.5) + fastgen(recovery=0.95)",
    "fastgen(recovery=0.9)",
    "h2o(heavy=0.125, recent=0.125)",
    "streaming(sinks=4, window=188)",
    "snapkv(budget=32)",
    "fastgen(recovery=0.8)",
]


# budgets for ~1024-token needle prompts: about 1/2 and 1/4 of the cache for each policy
NIAH_RECIPES = [
    "noop",
    "h2o(heavy=0.25, recent=0.25)",
    "h2o(heavy=0.125, recent=0.125)",
    "snapkv(budget=512)",
    "snapkv(budget=256)",
    "streaming(sinks=4, window=508)",
    "streaming(sinks=4, window=252)",
    "fastgen(recovery=0.95)",
    "fastgen(recovery=0.9)",
    "lowrank_kv(keep=0.5)",
    "lowrank_kv(keep=0.5) + fastgen(recovery=0.95)",
]


def policy_of(recipe: str) -> str:
    names = [part.split("(")[0].strip() for part in recipe.split("+")]
    return "+".join(names) if names != ["noop"] else "dense"


@torch.inference_mode()
def stream_eval(cm: CompiledModel, ids: torch.Tensor, prefix: int) -> dict:
    """Prefill ``prefix`` tokens, decode the rest one by one; NLL of the decoded tokens and memory held."""
    rt, info = cm._runtime, cm.info
    T = ids.shape[1]
    state = [s.empty(1, ids.device) for s in rt.specs]
    pos = torch.arange(T)[None]
    logits, state = rt.step(ids[:, :prefix], pos[:, :prefix], torch.tensor([prefix - 1]), state)
    fastgen = {s.layer: t for s, t in zip(rt.specs, state) if s.name.startswith("fastgen_policy")}
    policies = torch.cat([t.flatten() for t in fastgen.values()]).bincount(minlength=5).tolist() if fastgen else None
    nll, kept = [token_nll(logits[:, -1:], ids[:, prefix:prefix + 1])], []
    zero = torch.zeros(1, dtype=torch.long)
    for t in range(prefix, T - 1):
        logits, state = rt.step(ids[:, t:t + 1], pos[:, t:t + 1], zero, state)
        nll.append(token_nll(logits[:, -1:], ids[:, t + 1:t + 2]))
        per = kept_tokens_per_head(state, rt.specs, info.num_layers, info.num_kv_heads)
        kept.append(sum(float(k.sum()) for k in per) / (len(per) * info.num_kv_heads * (t + 1)))
    nll = torch.cat(nll, dim=1)
    dense = info.dense_kv_bytes_per_token() * (T - 1)
    return {"ppl": math.exp(float(nll.double().mean())), "scored": nll.shape[1],
            "kv_fraction": state_bytes(state, rt.specs) / dense, "kept_fraction": sum(kept) / len(kept),
            "kept_fraction_last": kept[-1], "fastgen_policy_counts": policies}


def niah_eval(cm: CompiledModel, tok, cases) -> dict:
    """Needle accuracy of ``cm`` and the KV bytes it held at the end of each case, vs dense."""
    from graphwright.eval.niah import run_niah

    fractions = []
    orig = cm.generate

    def generate(*a, **kw):  # record the memory held after every case
        out = orig(*a, **kw)
        fractions.append(cm.last_stats["kv_bytes"] / cm.last_stats["kv_bytes_dense"])
        return out

    cm.generate = generate
    r = run_niah(cm, tok, cases, progress=False)
    return {"niah": r["accuracy"], "kv_fraction": sum(fractions) / len(fractions),
            "niah_by_depth": r["by_depth"], "answers": [c["answer"] for c in r["cases"]]}


def plot(rows, path, y="ppl", ylabel="streaming perplexity of decoded tokens", better="lower"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r[y] for r in rows if r["policy"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    series: dict = {}
    for r in rows:
        if r["policy"] != "dense":
            series.setdefault(r["policy"], []).append((r["kv_fraction"], r[y]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if base is not None:
        ax.axhline(base, color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("KV memory fraction held at the last step (vs dense)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"KV eviction on smollm2-135m ({better} is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=None,
                   help="recipes to compare (default: DEFAULT_RECIPES, or NIAH_RECIPES with --niah)")
    p.add_argument("--niah", action="store_true", help="needle-in-a-haystack accuracy instead of perplexity")
    p.add_argument("--niah-length", type=int, default=1024)
    p.add_argument("--niah-depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--niah-repeats", type=int, default=2, help="haystacks per depth")
    p.add_argument("--tokens", type=int, default=768)
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--out", default="results/eviction.json")
    p.add_argument("--plot", default="results/eviction.png")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = gw.load_model(args.model)
    recipes = args.recipes or (NIAH_RECIPES if args.niah else DEFAULT_RECIPES)
    if args.niah:
        from graphwright.eval.niah import needle_grid

        cases = needle_grid(tok, lengths=[args.niah_length], depths=args.niah_depths, seed=0, repeats=args.niah_repeats)
    else:
        ids = encode_text(tok, read_text(), args.tokens)
    sg = capture(model)
    rows = []
    for recipe in recipes:
        t0 = time.perf_counter()
        new, parsed, _ = run_recipe(sg, recipe, model=model, tokenizer=tok, verify=False)
        cm = CompiledModel(new, tokenizer=tok, recipe=parsed)
        r = niah_eval(cm, tok, cases) if args.niah else stream_eval(cm, ids, args.prefix)
        rows.append({"recipe": recipe, "policy": policy_of(recipe), **r, "seconds": time.perf_counter() - t0})
        dense = next((row for row in rows if row["policy"] == "dense"), None)
        if args.niah and dense is not None:  # answers identical to the dense model's (a finer signal than accuracy)
            rows[-1]["same_answer_as_dense"] = sum(a == b for a, b in zip(r["answers"], dense["answers"])) / len(cases)
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        setup = ({"niah_length": args.niah_length, "depths": args.niah_depths, "repeats": args.niah_repeats}
                 if args.niah else {"tokens": args.tokens, "prefix": args.prefix})
        Path(args.out).write_text(json.dumps({"model": args.model, **setup, "rows": rows}, indent=1))
    if args.niah:
        plot(rows, args.plot, y="niah", ylabel=f"needle accuracy ({args.niah_length}-token prompts)", better="higher")
    else:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
