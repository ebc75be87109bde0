"""A prompt in ONNX Runtime as one step or as steps of N tokens (``onnx_model.prompt_chunking``), alternating in one process.

Usage (an artifact from ``bench/bench_decode.py --export-only --prompts 4096 --artifacts DIR``)::

    python bench/bench_onnx_prompt_chunk.py DIR/smollm2_135m_identity --prompt 4096 --chunks 512 1024 --repeats 2

Loads the artifact once per setting (``gw.load(dir, prompt_chunk=...)``), then for ``--repeats`` rounds runs
``logits`` of the last position on a ``--prompt``-token slice of the shipped novel under each setting in turn
(one step first). Prints per setting the median wall and process-CPU seconds, tokens/s, the ratio to one step,
and max |logit difference| to one step; the machine's load (``graphwright.bench.load.MachineLoad``) is printed
and a busy run is labelled so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import graphwright as gw
from graphwright.bench.load import MachineLoad

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--chunks", type=int, nargs="+", default=[512])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    a = p.parse_args(argv)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    settings = [None, *a.chunks]
    models = {c: gw.load(a.artifact, session_options=so, prompt_chunk=c) for c in settings}
    from bench_decode import prompt_ids  # the first N tokens of the shipped novel, as the decode bench uses

    ids = prompt_ids(models[None].tokenizer, a.prompt, models[None].info.vocab_size)
    times = {c: [] for c in settings}
    ref, diff = None, {}
    with MachineLoad() as load:
        for _ in range(a.repeats):
            for c in settings:
                w, t = time.perf_counter(), time.process_time()
                out = models[c].logits(ids)[:, -1]
                times[c].append((time.perf_counter() - w, time.process_time() - t))
                if c is None:
                    ref = out
                diff[c] = float((out - ref).abs().max())
    base = statistics.median(w for w, _ in times[None])
    print(f"{a.artifact}: prompt {a.prompt} tokens, {a.threads} ORT threads, median of {a.repeats} alternating rounds")
    print("| prompt steps | wall s | CPU s | tokens/s | speed vs one step | max abs logit diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for c in settings:
        wall, cpu = statistics.median(w for w, _ in times[c]), statistics.median(t for _, t in times[c])
        name = "one step" if c is None else f"chunks of {c}"
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {a.prompt / wall:.0f} | {base / wall:.2f}x | {diff[c]:.1e} |")
    print(f"machine: {'BUSY (indicative only)' if load.busy else 'quiet'}; {load.as_dict()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
