"""One decode step's linears (every weight of the model, one row each) through each GEMV route, alternating.

Usage:

    python bench/bench_decode_gemv.py --threads 1 2 --rounds 5

The torch runtime's decode step multiplies one row by each of the model's 2-D weights (SmolLM2-135M:
211 weights, 538 MB, the tied LM head included); the step's time is mostly this stream
(``codegen/torch/decode_linear.py``). Routes, timed as a full pass over the weights in the step's
order (q, k, v, o, gate, up, down per layer, then the LM head), median of ``--rounds`` alternating
rounds after a warm pass:

* ``F.linear``: ATen on HF's [out, in] weights (what an unrewritten lowering runs);
* ``[in, out] copy``: ``x @ w.t().contiguous()`` (the torch backend's route on one thread);
* ``split``: ``linear_rows``'s row-block ``bmm`` over ``split_parts`` blocks (its route at >= 2 threads).

Each route's outputs are compared with ``F.linear``'s (max abs difference). The machine's load is
checked and a busy run is labelled so.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import graphwright as gw
from graphwright.bench.load import MachineLoad
from graphwright.bench.timing import alternate
from graphwright.codegen.torch.decode_linear import linear_rows, split_parts


def step_weights(model) -> list[torch.Tensor]:
    """The model's linear weights in decode-step order (each layer's, then the LM head)."""
    ws = [m.weight.detach() for name, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    return ws + [model.lm_head.weight.detach()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", type=int, default=1, help="rows per GEMV (batch size at decode)")
    a = p.parse_args(argv)
    model, _ = gw.load_model(a.model)
    ws = step_weights(model)
    copies = [w.t().contiguous() for w in ws]
    g = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(a.rows, k, generator=g) for k in {w.shape[1] for w in ws}}
    routes = {"F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
              "[in, out] copy": lambda: [xs[c.shape[0]] @ c for c in copies],
              "split": lambda: [linear_rows(xs[w.shape[1]], w) for w in ws]}
    mb = sum(w.numel() * w.element_size() for w in ws) / 1e6
    print(f"{a.model}: {len(ws)} weights, {mb:.0f} MB, {a.rows} row(s), median of {a.rounds} alternating rounds")
    print("| threads | route | ms per pass | GB/s | vs F.linear | max abs diff vs F.linear | blocks (LM head) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode(), MachineLoad() as load:
        for th in a.threads:
            torch.set_num_threads(th)
            want = routes["F.linear"]()
            diff = {r: max(float((o - w_).abs().max()) for o, w_ in zip(f(), want)) for r, f in routes.items()}
            times = alternate(routes, a.rounds)
            base = statistics.median(times["F.linear"])
            for r in routes:
                ms = statistics.median(times[r]) * 1e3
                blocks = split_parts(ws[-1].shape[0], th) if r == "split" else 1
                print(f"| {th} | {r} | {ms:.2f} | {mb / ms:.1f} | {base * 1e3 / ms:.2f}x | {diff[r]:.1e} | {blocks} |")
    print(f"machine: {'BUSY (indicative only)' if load.busy else 'quiet'}; {load.as_dict()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
