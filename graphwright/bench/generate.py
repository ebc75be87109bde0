"""Speed and KV memory of ``cm.generate`` against HF ``generate()`` on the same prompt.

Runs alternate (HF, graphwright, HF, graphwright, ...) so that machine noise — other jobs,
thermal state, caches — hits both sides alike, and medians are reported with the ratios
graphwright / HF. Both sides produce exactly ``max_new_tokens`` greedy tokens (HF via
``min_new_tokens``, graphwright with ``eos_token_id=[]``), so the work is the same.
"""

from __future__ import annotations

from statistics import median, median_low

import torch
from tqdm.auto import tqdm

from .memory import PeakMemory
from .timing import hf_generate, hf_prefill

METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s", "kv_bytes", "kv_peak_bytes",
           "peak_mem_bytes")


def _ours(cm, input_ids, attention_mask, max_new_tokens):
    with PeakMemory(input_ids.device) as mem:
        out = cm.generate(input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask, eos_token_id=[])
    s = {**cm.last_stats, "peak_mem_bytes": mem.peak_bytes}
    return out, {k: s[k] for k in (*METRICS, "kv_bytes_dense")}


def _theirs(model, input_ids, attention_mask, max_new_tokens, pad):
    prefill_s = hf_prefill(model, input_ids, attention_mask)
    with PeakMemory(input_ids.device) as mem:
        g = hf_generate(model, input_ids, attention_mask, max_new_tokens, pad_token_id=pad)
    prompt = int(attention_mask.sum())
    row = {"prefill_s": prefill_s, "prefill_tokens_per_s": prompt / prefill_s if prefill_s > 0 else 0.0,
           **{k: g[k] for k in ("decode_s", "decode_tokens_per_s", "kv_bytes", "kv_peak_bytes")},
           "peak_mem_bytes": mem.peak_bytes}
    return g["tokens"], row


def _medians(rows, keys) -> dict:
    """Median per metric; byte counts stay integers (median_low picks a measured value)."""
    return {k: median_low(r[k] for r in rows) if "bytes" in k else median(r[k] for r in rows) for k in keys}


def bench_generate(base_model, cm, input_ids, max_new_tokens: int = 64, repeats: int = 3, warmup: int = 1,
                   attention_mask=None, progress: bool = True) -> dict:
    """Measure HF ``generate()`` and ``cm.generate`` alternately; medians per side and ratios ours/HF.

    Returns plain data: ``{"batch", "prompt_tokens", "new_tokens", "repeats", "warmup",
    "hf": {metric: median}, "graphwright": {metric: median}, "ratios": {metric: ours/hf},
    "same_tokens": bool, "runs": {"hf": [...], "graphwright": [...]}}`` with metrics
    prefill/decode tokens/s and seconds, ``kv_bytes`` (cache at the end), ``kv_peak_bytes`` and
    ``peak_mem_bytes`` (peak process memory increase during the generation, ``memory.py``).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    base_model.eval()
    pad = cm.info.pad_token_id if cm.info.pad_token_id is not None else (cm.info.eos_token_id or (0,))[0]
    runs = {"hf": [], "graphwright": []}
    same = True
    with tqdm(total=warmup + repeats, desc="bench (HF, graphwright alternately)", unit="pair",
              disable=None if progress else True, leave=False) as bar:
        for i in range(warmup + repeats):
            theirs, h = _theirs(base_model, input_ids, attention_mask, max_new_tokens, pad)
            ours, g = _ours(cm, input_ids, attention_mask, max_new_tokens)
            if i >= warmup:
                runs["hf"].append(h)
                runs["graphwright"].append(g)
                same = same and theirs.shape == ours.shape and bool(torch.equal(theirs, ours))
            bar.update(1)
    hf = _medians(runs["hf"], METRICS)
    gw = _medians(runs["graphwright"], (*METRICS, "kv_bytes_dense"))
    ratios = {k: gw[k] / hf[k] if hf[k] else float("nan") for k in METRICS}
    return {"batch": input_ids.shape[0], "prompt_tokens": int(attention_mask.sum()), "new_tokens": max_new_tokens,
            "repeats": repeats, "warmup": warmup, "hf": hf, "graphwright": gw, "ratios": ratios,
            "same_tokens": same, "runs": runs}


def format_bench(result: dict) -> str:
    """The result as a rich table (rendered to a string): HF, graphwright and the ratio per metric."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"generate: batch {result['batch']}, prompt {result['prompt_tokens']} tokens, "
                    f"{result['new_tokens']} new, median of {result['repeats']} alternating runs")
    for col, just in (("metric", "left"), ("HF", "right"), ("graphwright", "right"), ("graphwright/HF", "right")):
        t.add_column(col, justify=just)
    fmt = {"prefill_tokens_per_s": "{:,.1f}", "decode_tokens_per_s": "{:,.1f}", "prefill_s": "{:.4f}",
           "decode_s": "{:.4f}", "kv_bytes": "{:,.0f}", "kv_peak_bytes": "{:,.0f}", "peak_mem_bytes": "{:,.0f}"}
    for k, f in fmt.items():
        t.add_row(k, f.format(result["hf"][k]), f.format(result["graphwright"][k]), f"{result['ratios'][k]:.2f}")
    t.caption = f"same greedy tokens: {'yes' if result['same_tokens'] else 'no'}"
    console = Console(width=120, record=True, file=None, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(t)
    return cap.get()
