"""One StreamingLLM layer's decode attention in ONNX Runtime: re-rotating by rank vs the shifted query.

``decode_slots.rope_cache_index_decode`` (before ``codegen/onnx/streaming_shift.py``) ranked the S slots
by position (S x S comparisons per KV head) and rotated every cached key at every step;
``streaming_shift.shifted_decode_attention`` rotates only the query (back by the evicted count) and
reads keys cached at their absolute rotation. Both are exported alone (``torch.onnx.export``, static
shapes, SmolLM2-135M head layout) and timed alternating in one process, after checking they agree.

Usage: ``python bench/bench_streaming_decode_onnx.py --sinks 4 --window 1020 --runs 200``.
Timings are only meaningful on an idle machine; the load average before and after is printed.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import onnxruntime as ort
import torch

from graphwright.capture.ops import attention_reference
from graphwright.codegen.onnx.decode_slots import rope_cache_index_decode
from graphwright.codegen.onnx.streaming_shift import shifted_decode_attention
from graphwright.ops.rope_index_ref import _rotate, rope_angles


class Rank(torch.nn.Module):
    def __init__(self, inv, scale):
        super().__init__()
        self.register_buffer("inv", inv)
        self.scale = scale

    def forward(self, q_pre, k_pre, v, q_pos, k_pos):
        q, k = rope_cache_index_decode(q_pre, k_pre, k_pos, self.inv, 1.0)
        return attention_reference(q, k, v, q_pos, k_pos, self.scale)


class Shifted(torch.nn.Module):
    def __init__(self, inv, scale, sinks, window):
        super().__init__()
        self.register_buffer("inv", inv)
        self.scale, self.sinks, self.window = scale, sinks, window

    def forward(self, q_abs, k_abs, v, q_pos, k_pos):
        return shifted_decode_attention(q_abs, k_abs, v, q_pos, k_pos, self.scale, None, self.inv, self.sinks, self.window)


def _session(module, args, threads):
    f = io.BytesIO()
    torch.onnx.export(module.eval(), args, f, dynamo=True, opset_version=23, verbose=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(f.getvalue(), so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--evicted", type=int, default=3000, help="tokens already evicted from the row")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    H, Hk, D = 9, 3, 64
    inv = 1.0 / (100000.0 ** (torch.arange(0, D, 2).float() / D))
    S = a.sinks + a.window + 1
    L = S + a.evicted
    cached = list(range(a.sinks)) + list(range(L - 1 - a.window, L))
    g = torch.Generator().manual_seed(0)
    # unordered cached slots; the new token (position L - 1) in the last slot, where cache_append puts it
    k_pos = torch.stack([torch.tensor(cached[:-1])[torch.randperm(S - 1, generator=g)] for _ in range(Hk)])[None]
    k_pos = torch.cat([k_pos, torch.full((1, Hk, 1), L - 1)], dim=2)
    q_pos = torch.tensor([[L - 1]])
    k_pre, v = torch.randn(1, Hk, S, D, generator=g), torch.randn(1, Hk, S, D, generator=g)
    q_pre = torch.randn(1, H, 1, D, generator=g)
    ck, sk = rope_angles(k_pos, inv)
    cq, sq = rope_angles(q_pos, inv)
    k_abs, q_abs = _rotate(k_pre, ck, sk, 1.0), _rotate(q_pre, cq[:, None], sq[:, None], 1.0)
    scale = D ** -0.5
    rank_args, shift_args = (q_pre, k_pre, v, q_pos, k_pos), (q_abs, k_abs, v, q_pos, k_pos)
    sessions = {"rank (before)": (_session(Rank(inv, scale), rank_args, a.threads), rank_args),
                "shifted query (now)": (_session(Shifted(inv, scale, a.sinks, a.window), shift_args, a.threads), shift_args)}
    outs = {}
    for name, (s, args) in sessions.items():
        feeds = {i.name: t.numpy() for i, t in zip(s.get_inputs(), args)}
        outs[name] = (s, feeds, torch.from_numpy(s.run(None, feeds)[0]))
    diff = float((outs["rank (before)"][2] - outs["shifted query (now)"][2]).abs().max())
    print(f"S={S} slots (sinks {a.sinks} + window {a.window} + 1), H={H} Hk={Hk} D={D}; max |diff| {diff:.2e}; "
          f"load average before {os.getloadavg()}")
    times = {n: [] for n in outs}
    for _ in range(a.runs):
        for name, (s, feeds, _) in outs.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:22s} median {statistics.median(ts) * 1e3:8.3f} ms per layer step")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
