"""The optimizer step alone, onnxscript's rewrite rules unfiltered vs filtered (``codegen/onnx/rule_filter.py``).

Usage: python bench/rule_filter_ab.py [--model smollm2-135m] [--recipe NAME ...] [--context 256] [--rounds 3]

Each recipe (names of ``bench/bench_decode.py``) is exported once (no verification, ``decode_process`` off so every
graph is optimized in this process) while the ONNX model each ``optimize`` call receives is kept as a proto. Then,
``--rounds`` times, each kept model is optimized with ``rule_filter.ENABLED`` off then on, alternating in this one
process; printed: this process's CPU seconds per optimize (and wall), and whether the two results serialize to the
same bytes. On a shared machine read CPU seconds; the load average before/after is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import graphwright as gw
from graphwright.codegen.onnx import decode_process, rule_filter
from graphwright.codegen.onnx import export as export_mod
from graphwright.codegen.onnx.optimize import optimize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import RECIPES as NAMED  # noqa: E402
from bench_decode import recipe_text  # noqa: E402


class _Program:  # what ``optimize`` reads of a ``torch.onnx.ONNXProgram``
    def __init__(self, model):
        self.model = model


def kept_models(cm) -> list:
    """The models ``optimize`` received during one export of ``cm`` (protos, before optimizing)."""
    import onnx_ir as ir

    kept, original = [], export_mod.optimize

    def keep(program):
        kept.append(ir.serde.serialize_model(program.model))
        return original(program)

    export_mod.optimize, default = keep, decode_process.ENABLED
    decode_process.ENABLED = False
    try:
        with tempfile.TemporaryDirectory(prefix="gw-rule-filter-") as tmp:
            gw.export_onnx(cm, tmp, verify=False, overwrite=True)
    finally:
        export_mod.optimize, decode_process.ENABLED = original, default
    return kept


def optimized(proto, on: bool) -> tuple:
    """(CPU s, wall s, serialized result) of ``optimize`` on a fresh copy of ``proto`` with the filter ``on``."""
    import onnx_ir as ir

    program = _Program(ir.serde.deserialize_model(proto))
    rule_filter.ENABLED = on
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        optimize(program)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        rule_filter.ENABLED = True
    return cpu, wall, ir.serde.serialize_model(program.model).SerializeToString()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", action="append", default=None)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    model, tok = gw.load_model(args.model)
    for recipe in args.recipe or ["identity"]:
        text = recipe_text(recipe, args.context) if recipe in NAMED else recipe
        cm = gw.compile(model, recipe=text, tokenizer=tok, verify=False)
        for g, proto in enumerate(kept_models(cm)):
            cols = {False: [], True: []}
            same = True
            for _ in range(args.rounds):
                results = {}
                for on in (False, True):
                    cpu, wall, data = optimized(proto, on)
                    cols[on].append((cpu, wall))
                    results[on] = data
                same = same and results[False] == results[True]
            print(f"{recipe} graph {g} ({len(proto.graph.node)} nodes before): unfiltered CPU s "
                  f"{' / '.join(f'{c:.2f}' for c, _ in cols[False])}, filtered {' / '.join(f'{c:.2f}' for c, _ in cols[True])} "
                  f"(wall {' / '.join(f'{w:.1f}' for _, w in cols[False])} vs {' / '.join(f'{w:.1f}' for _, w in cols[True])}); "
                  f"same bytes: {same}; load {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
