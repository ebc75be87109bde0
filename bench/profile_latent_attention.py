"""Where one decode step of one latent attention layer spends its time (torch backend, CPU).

Usage: python bench/profile_latent_attention.py --prompt 1024 4096 --rank 97 --threads 2

Random inputs at smollm2-135m's shapes (H=9, H_kv=3, D=64, full rotary; ``--rank`` r_k = r_v,
97 is the mean rank of lowrank_kv(keep=0.5)), B=1, one query. Times (median of ``--reps``):

* the previous torch path, by part: the key GEMM, RoPE with cos/sin of every position
  (``rope_keys``), SDPA over the rebuilt keys and the latent values broadcast to the KV heads;
* the current path (``latent_decode``) whole and by part: key GEMM, k_bias + table RoPE,
  scores + mask + softmax, P @ c_v;
* dense attention (``attention_sdpa``) over [1, 3, S, 64] keys and values, for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from graphwright.capture.ops import visible_mask
from graphwright.codegen.torch import rope_table
from graphwright.codegen.torch.attention import attention_sdpa
from graphwright.codegen.torch.latent_attention import latent_decode, rebuild_keys_fast
from graphwright.codegen.torch.rope_table import rope_cos_sin
from graphwright.ops.latent_attention import rope_keys

H, HK, D = 9, 3, 64


def timed(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def profile(S: int, r: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, 1, D, generator=g)
    c_k, c_v = torch.randn(1, S, r, generator=g), torch.randn(1, S, r, generator=g)
    k_up, k_bias = torch.randn(r, HK * D, generator=g) / r ** 0.5, None
    k_pos = torch.arange(S)[None]
    q_pos = k_pos[:, -1:].clone()
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, D, 2).float() / D))
    k_dense, v_dense = torch.randn(1, HK, S, D, generator=g), torch.randn(1, HK, S, D, generator=g)
    args = (q, c_k, c_v, k_up, k_bias, None, None, q_pos, k_pos, inv_freq, 1.0, 0.125)
    k_old = torch.matmul(c_k, k_up).view(1, S, HK, D).transpose(1, 2)
    k_rot = rope_keys(k_old, k_pos, inv_freq, 1.0)
    v_lat = c_v[:, None].expand(1, HK, S, r)
    k_new = rebuild_keys_fast(c_k, k_up, None, k_pos, inv_freq, 1.0, D)
    qg = q.reshape(1, HK, 3, D) * 0.125
    mask = visible_mask(q_pos, k_pos)

    def scores_softmax():
        s = torch.matmul(qg, k_new.permute(0, 2, 3, 1)).view(1, HK, 3, 1, S)
        return torch.softmax(s.masked_fill_(~mask, -3.4e38), dim=-1)

    probs = scores_softmax()
    return {
        "old: key GEMM": timed(lambda: torch.matmul(c_k.float(), k_up.float()), reps),
        "old: RoPE (cos/sin per position)": timed(lambda: rope_keys(k_old, k_pos, inv_freq, 1.0), reps),
        "old: SDPA over rebuilt K, latent V": timed(lambda: attention_sdpa(q, k_rot, v_lat, q_pos, k_pos, 0.125), reps),
        "new: whole layer": timed(lambda: latent_decode(*args), reps),
        "new: key GEMM": timed(lambda: torch.mm(c_k.view(S, r), k_up), reps),
        "new: cos/sin gather (memo miss: 1st layer)": timed(lambda: (rope_table._MEMO.clear(), rope_cos_sin(k_pos, inv_freq, 1.0)), reps),
        "new: cos/sin memo hit (other layers)": timed(lambda: rope_cos_sin(k_pos, inv_freq, 1.0), reps),
        "new: GEMM + RoPE in place": timed(lambda: rebuild_keys_fast(c_k, k_up, None, k_pos, inv_freq, 1.0, D), reps),
        "new: scores + mask + softmax": timed(scores_softmax, reps),
        "new: P @ c_v": timed(lambda: torch.bmm(probs.view(1, H, S), c_v), reps),
        "dense: SDPA over K, V": timed(lambda: attention_sdpa(q, k_dense, v_dense, q_pos, k_pos, 0.125), reps),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--rank", type=int, default=97)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        for S in args.prompt:
            res = profile(S, args.rank, args.reps)
            old = sum(v for k, v in res.items() if k.startswith("old"))
            print(f"S={S} r={args.rank} threads={torch.get_num_threads()}: old path total {old:.3f} ms/layer")
            for k, v in res.items():
                print(f"  {k:<40} {v:8.3f} ms")


if __name__ == "__main__":
    main()
