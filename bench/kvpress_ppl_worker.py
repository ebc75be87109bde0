"""The kvpress side of ``bench/kvpress_ppl.py``: long-text perplexity under kvpress's presses; runs in
``bench/.venv-kvpress`` and never imports graphwright.

Usage (``bench/kvpress_ppl.py`` calls it): ``bench/.venv-kvpress/bin/python bench/kvpress_ppl_worker.py SPEC.json``

For every held-out window (token ids written by graphwright's side, so both sides score the very same tokens) and
every press and budget: the first ``prefix`` tokens are one forward pass under ``with press(model)`` into a
``DynamicCache`` (kvpress compresses there, as its pipeline compresses a context), then the rest of the window but
its last token is one teacher-forced forward pass over that cache, outside the press, at the tokens' own positions.
Scored: tokens ``prefix + 1 .. window - 1``, each predicted from the tokens before it, which are the tokens
graphwright's ``eval.perplexity.long_perplexity`` scores (``nll[prefix:]`` of ``score_stream``). kvpress compresses a
prefill once and then appends, like graphwright's ``snapkv``, so the same cache is seen either way.

Bytes: ``kvpress_worker.cache_storage_bytes`` of the cache after the window's last fed token (masking presses, AdaKV,
show dense bytes). Resumable: every window's row is appended at once to ``spec["journal"]``, keyed by model, press,
budget, window id, a sha256 of the window's ids and prefix, and the worker version.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from kvpress_worker import _kvpress_version, _load, _null, _presses, append_journal, cache_storage_bytes, ids_hash, load_journal

WORKER_VERSION = "kvpress-ppl-worker-1"  # bump when scoring or byte counting changes


@torch.inference_mode()
def window_nll(model, press, ids: list, prefix: int) -> dict:
    """Mean NLL of tokens prefix+1..T-1 of ``ids`` after a (compressed) prefill of ``prefix`` tokens; cache bytes and
    tokens held (layer 0) after the last fed token."""
    from transformers import DynamicCache

    x = torch.tensor([ids])
    T = x.shape[1]
    if not 1 <= prefix <= T - 2:
        raise ValueError(f"prefix must be in [1, {T - 2}] for a window of {T} tokens; got {prefix}")
    cache = DynamicCache()
    with press(model) if press is not None else _null():
        model(input_ids=x[:, :prefix], past_key_values=cache, logits_to_keep=1)
    kept = int(cache.get_seq_length())
    out = model(input_ids=x[:, prefix:T - 1], past_key_values=cache, position_ids=torch.arange(prefix, T - 1)[None])
    nll = torch.nn.functional.cross_entropy(out.logits[0].float(), x[0, prefix + 1:T], reduction="mean")
    return {"nll": float(nll), "cache_bytes": cache_storage_bytes(cache), "kept_prefix_tokens": kept, "tokens_held": int(cache.get_seq_length())}


def key_of(spec: dict, window: dict, name: str, budget, version: str) -> str:
    return json.dumps({"model": spec["model"], "method": name, "budget": budget, "window": window["id"],
                       "case_hash": ids_hash(window["ids"], spec["prefix"]), "prefix": spec["prefix"],
                       "version": f"{WORKER_VERSION}/kvpress-{version}"}, sort_keys=True)


def run(spec: dict) -> None:
    torch.manual_seed(0)
    factories = _presses(spec)
    for name in spec["presses"]:
        if name not in factories:
            raise SystemExit(f"unknown press {name!r}; known: {', '.join(factories)}")
    version = _kvpress_version()
    journal = spec["journal"]
    done = load_journal(journal)
    model = _load(spec["model_dir"], "sdpa")
    jobs = [("dense", None)] + [(p, b) for p in spec["presses"] for b in spec["budgets"]]
    for window in spec["windows"]:  # window by window, so a run stopped early holds the same windows for every press
        for name, budget in jobs:
            key = key_of(spec, window, name, budget, version)
            if key in done:
                continue
            t0 = time.perf_counter()
            press = None if name == "dense" else factories[name](1.0 - budget)
            row = {"method": name, "budget": budget, "window": window["id"], **window_nll(model, press, window["ids"], spec["prefix"])}
            append_journal(journal, key, row)
            done[key] = row
            print(f"kvpress ppl {window['id']} {name}@{budget}: nll {row['nll']:.4f} bytes {row['cache_bytes']} "
                  f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: kvpress_ppl_worker.py SPEC.json (called by bench/kvpress_ppl.py)")
    run(json.loads(open(argv[0]).read()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
