"""``graphwright heads profile``: measure a per-KV-head head set (retrieval score or DuoAttention gates).

``graphwright heads profile --model smollm2-135m --method retrieval --out heads.json`` scores heads
on seeded NIAH cases (arXiv 2404.15574); ``--method mass`` measures each head's attention mass on the
needles while the model answers RULER multi-value cases (``graphwright.heads.needle_mass``); ``--method duo``
fits DuoAttention gates on seeded passkey samples (arXiv 2410.10819). The file is the ``graphwright.headset/1`` JSON that ``duo(retrieval=...)``
reads. An existing ``--out`` is refused (before any model loads) unless ``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path

from .common import add_model_args, console, float_arg, int_arg, load, out_file


def _lengths(text: str) -> tuple:
    import argparse

    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated token counts like 512,1024; got {text!r}") from None
    if not vals or any(not 64 <= v <= 131072 for v in vals):
        raise argparse.ArgumentTypeError(f"each length must be in [64, 131072]; got {text!r}")
    return vals


def add_parser(sub):
    p = sub.add_parser("heads", help="classify KV heads as retrieval or streaming (retrieval score / DuoAttention gates)",
                       description="Per-KV-head classification: write a head-set JSON for the duo pass.")
    hs = p.add_subparsers(dest="heads_command", metavar="ACTION")
    hs.required = True
    q = hs.add_parser("profile", help="measure a head set and write it as JSON",
                      description="retrieval: NIAH retrieval score (arXiv 2404.15574); duo: DuoAttention gates (arXiv "
                                  "2410.10819); mass: needle attention mass at the answer rows (QRHead, arXiv 2506.09944)")
    add_model_args(q)
    q.add_argument("--method", choices=("retrieval", "duo", "mass"), default="retrieval",
                   help="retrieval: copy score on NIAH cases; duo: DuoAttention gates; mass: needle attention mass at the "
                        "answer rows on RULER multi-value cases (--lengths, --cases, --max-new-tokens, --threshold)")
    q.add_argument("--out", type=out_file, default=None, help="head-set JSON to write (default: results/heads/<model>_<method>.json)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    q.add_argument("--seed", type=int_arg(0, 2**63 - 1), default=0)
    r = q.add_argument_group("retrieval")
    r.add_argument("--lengths", type=_lengths, default=(512, 1024), help="NIAH prompt lengths in tokens (default 512,1024)")
    r.add_argument("--cases", type=int_arg(1, 100_000), default=16, help="NIAH cases per length")
    r.add_argument("--max-new-tokens", type=int_arg(1, 4096), default=24)
    r.add_argument("--pool", choices=("max", "mean"), default="max", help="pool a GQA group's query-head scores to its KV head")
    r.add_argument("--threshold", type=float_arg(0, 1), default=0.1, help="retrieval heads: score > threshold")
    d = q.add_argument_group("duo")
    d.add_argument("--steps", type=int_arg(1, 1_000_000), default=200)
    d.add_argument("--samples", type=int_arg(1, 100_000), default=16, help="samples (cycled over the steps)")
    d.add_argument("--context", type=int_arg(32, 131072), default=768, help="tokens per sample")
    d.add_argument("--data", choices=("passkey", "ruler"), default="passkey",
                   help="passkey samples, or RULER multi-value needle cases (seeds from --seed + 1; the evaluation uses 0)")
    d.add_argument("--rows", choices=("answer", "all"), default="answer",
                   help="rows that mix full and streaming attention: answer (default) only over a dense prompt, as "
                        "graphwright's duo runs (each prompt runs once, so a step costs its answer only), or all (the paper)")
    d.add_argument("--sink", type=int_arg(0, 131072), default=16)
    d.add_argument("--recent", type=int_arg(1, 131072), default=64)
    d.add_argument("--lam", type=float_arg(0, 1e6), default=0.05, help="L1 weight on the gates")
    d.add_argument("--lr", type=float_arg(0, 10, lo_open=True), default=0.02)
    d.add_argument("--sparsity", type=float_arg(0, 1), default=0.5, help="target share of streaming heads (ignored with --tau)")
    d.add_argument("--tau", type=float_arg(0, 1), default=None, help="fixed gate threshold: retrieval iff gate >= tau")


def run(args):
    from ..heads import profile

    out = Path(args.out or f"results/heads/{Path(str(args.model)).stem}_{args.method}.json")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    model, tok = load(args)
    hs = profile(model, args.method, tokenizer=tok, name=Path(str(args.model)).stem if "/" in str(args.model) else str(args.model),
                 seed=args.seed, pool=args.pool, lengths=args.lengths, cases=args.cases, max_new_tokens=args.max_new_tokens,
                 threshold=args.threshold, steps=args.steps, samples=args.samples, context=args.context, sink=args.sink,
                 recent=args.recent, lam=args.lam, lr=args.lr, sparsity=args.sparsity, tau=args.tau, data=args.data, rows=args.rows)
    hs.save(out, overwrite=args.overwrite)
    top = ", ".join(f"({layer},{head}) {s}" for layer, head, s in hs.measured["top_kv_heads"][:5])
    console.print(f"{args.method} head set for {args.model}: {len(hs.retrieval)} of {hs.num_layers * hs.num_kv_heads} KV heads "
                  f"retrieval ({hs.settings['selection']}); top: {top}")
    console.print(f"[dim]written {out}[/]")
