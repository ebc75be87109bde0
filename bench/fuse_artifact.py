"""A copy of a dense ONNX artifact with sibling MatMuls fused (``codegen/onnx/fuse_matmul.py``), for an A/B without re-exporting.

Usage::

    python bench/fuse_artifact.py ART/smollm2_135m_identity /tmp/fused/smollm2_135m_identity
    python bench/profile_onnx_decode.py ART/smollm2_135m_identity /tmp/fused/smollm2_135m_identity --compare 4

Reads ``model.onnx`` of an artifact without a decode graph (``decode.onnx`` shares ``model.onnx.data``;
export with ``optimize.FUSE_SIBLINGS = True`` for those), fuses it, writes it with its own weights file,
copies ``graphwright.json`` and the tokenizer, records the new files' hashes, and checks the copy against
the original in ONNX Runtime: logits of a 32-token prompt and 8 greedy tokens (max |logit difference| printed,
tokens must be equal; the export's verification against torch still describes the original).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import graphwright as gw
from graphwright.codegen.onnx.artifact import METADATA, MODEL, read_metadata
from graphwright.codegen.onnx.fuse_matmul import fuse_sibling_matmuls
from graphwright.codegen.onnx.manifest import record_files


def fuse_copy(src: Path, dst: Path) -> int:
    import onnx_ir as ir

    meta = read_metadata(src)
    if (meta.get("decode") or {}).get("model_file") or meta.get("gemfilter"):
        raise SystemExit(f"{src}: has a second graph sharing model.onnx.data; export it with optimize.FUSE_SIBLINGS = True")
    if meta["model_file"] != MODEL:
        raise SystemExit(f"{src}: model file {meta['model_file']!r}, expected {MODEL!r}")
    if dst.exists():
        raise SystemExit(f"{dst}: exists; give a new folder")
    dst.mkdir(parents=True)
    model = ir.load(str(src / MODEL))
    removed = fuse_sibling_matmuls(model)
    ir.save(model, str(dst / MODEL), external_data=MODEL + ".data")
    tok = meta.get("tokenizer")
    if tok:
        shutil.copytree(src / tok, dst / tok)
    meta["files"] = record_files(dst, [name for name in meta["files"] if (dst / name).is_file()])
    (dst / METADATA).write_text(json.dumps(meta, indent=1))
    return removed


def check(src: Path, dst: Path) -> float:
    a, b = gw.load(src), gw.load(dst)
    ids = torch.randint(0, a.info.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    diff = (a.logits(ids) - b.logits(ids)).abs().max().item()
    kw = dict(max_new_tokens=8, eos_token_id=[])
    if not torch.equal(a.generate(ids, **kw), b.generate(ids, **kw)):
        raise SystemExit(f"{dst}: greedy tokens differ from {src}")
    return diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="an exported artifact without decode.onnx")
    p.add_argument("dst", type=Path, help="a new folder for the fused copy")
    args = p.parse_args()
    t0 = time.perf_counter()
    removed = fuse_copy(args.src, args.dst)
    t1 = time.perf_counter()
    diff = check(args.src, args.dst)
    print(f"{args.dst}: {removed} MatMuls fewer ({t1 - t0:.1f} s); max |logit difference| vs {args.src.name}: {diff:.3g}; "
          "greedy tokens equal")


if __name__ == "__main__":
    main()
