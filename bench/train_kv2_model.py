"""Train a small Qwen2-shaped model with two KV heads on the shipped novel, for lowrank_kv quality work.

No real model with two KV heads is available offline (SmolLM2-135M has three), and random weights
say nothing about quality, so this script trains one, seeded, on CPU: a ``transformers.Qwen2Config``
(RoPE, q/k/v biases, grouped-query attention 8 query heads : 2 KV heads) over UTF-8 bytes
(``graphwright.eval.bytetok.ByteTokenizer``, vocabulary 256), on the calibration part of the shipped
novel (``graphwright.eval.data.split_point``: the first 60%). The last 40% is held out; the
script reports the model's held-out perplexity (``graphwright.eval.perplexity``, same windows
as ``bench/lowrank_kv2.py``) next to a unigram model's (byte frequencies of the training part,
add-one smoothed, scored on the same tokens).

Usage: python bench/train_kv2_model.py --out results/kv2-model --steps 300
Writes ``model.safetensors`` + ``config.json`` (``save_pretrained``, safetensors only) and
``train.json`` (shape, steps, seconds, losses, held-out and unigram perplexity) under ``--out``;
``graphwright.load_model(out)`` loads it (no tokenizer files: use the byte tokenizer).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from graphwright.eval.bytetok import ByteTokenizer
from graphwright.eval.data import read_text, split_point
from graphwright.eval.perplexity import perplexity


def split_ids(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte ids of the shipped novel, cut at the package's calibration/held-out split."""
    text = read_text()
    at = split_point(text)
    enc = lambda s: torch.tensor(tok(s).input_ids, dtype=torch.long)  # noqa: E731
    return enc(text[:at]), enc(text[at:])


def heldout_ids(n_tokens: int) -> torch.Tensor:
    """[1, n_tokens] of the held-out part (what ``bench/lowrank_kv2.py`` scores)."""
    _, held = split_ids(ByteTokenizer())
    if n_tokens > held.numel():
        raise ValueError(f"--eval-tokens {n_tokens} exceeds the held-out part ({held.numel()} bytes)")
    return held[None, :n_tokens]


def unigram_ppl(train: torch.Tensor, ids: torch.Tensor) -> float:
    """Perplexity of add-one-smoothed byte frequencies of ``train`` on ``ids[0, 1:]`` (the tokens
    ``perplexity`` scores when stride < window: every token after the first, once)."""
    counts = torch.bincount(train, minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[ids[0, 1:]].mean().item())


def build_config(args):
    from transformers import Qwen2Config

    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return Qwen2Config(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       head_dim=args.hidden // args.heads, max_position_embeddings=2048, rope_theta=10000.0,
                       tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.02,
                       bos_token_id=None, eos_token_id=0, pad_token_id=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, train.json)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out bytes scored at the end")
    p.add_argument("--window", type=int, default=None, help="perplexity window (default --seq: RoPE positions past the "
                   "training length are out of distribution; at 512 a seq-256 model scored 8.19 vs 6.85 at 64)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default window / 2: every scored byte "
                   "has >= window - stride context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on the shared 2-core machine one thread was faster)")
    args = p.parse_args(argv)
    args.window = args.window or args.seq
    args.stride = args.stride or args.window // 2
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import Qwen2ForCausalLM

    t0 = time.perf_counter()
    train, _ = split_ids(ByteTokenizer())
    config = build_config(args)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(1, min(100, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, train.numel() - args.seq - 1, (args.batch,), generator=g)
        batch = torch.stack([train[s:s + args.seq + 1] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), use_cache=False).loss
        # labels are shifted inside the HF loss: position t predicts input t+1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()

    ids = heldout_ids(args.eval_tokens)
    res = perplexity(model, input_ids=ids, max_tokens=args.eval_tokens, window=args.window, stride=args.stride, progress=False)
    uni = unigram_ppl(train, ids)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    meta = {"shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                      "head_dim": args.hidden // args.heads, "intermediate": args.intermediate, "vocab": 256,
                      "params": n_params},
            "tokenizer": "bytes (graphwright.eval.bytetok.ByteTokenizer)",
            "data": "shipped novel: train = text[:split_point], held out = text[split_point:]",
            "train_bytes": train.numel(), "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
            "seed": args.seed, "threads": args.threads, "train_seconds": train_s,
            "loss_first": losses[0], "loss_last50": sum(losses[-50:]) / len(losses[-50:]),
            "heldout_tokens": res["tokens"], "window": args.window, "stride": args.stride, "heldout_ppl": res["ppl"], "unigram_ppl": uni}
    (out / "train.json").write_text(json.dumps(meta, indent=2))
    print(f"{n_params / 1e6:.2f}M params, {args.steps} steps in {train_s:.0f} s; held-out perplexity "
          f"{res['ppl']:.3f} per byte vs unigram {uni:.3f} over {res['tokens']} bytes; wrote {out}")
    return meta


if __name__ == "__main__":
    main()
