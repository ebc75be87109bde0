"""Decode speed against prompt length across several ``bench_decode.py`` runs: one table and one plot of ratios.

Usage:

    python bench/plot_decode_runs.py bench/results/decode/s17_p256_steps.json bench/results/decode/s18_p2k.json \
        bench/results/decode/s18_p4k.json --out bench/results/decode/s18_by_length

Each ``bench_decode.py`` run measures one or more prompt lengths; on this shared host the absolute tokens/s of
two runs are not comparable (different host states), but a ratio taken inside one block is: a side's decode speed
over HF's step and over dense's on the same runtime, both measured in the same process, interleaved step by step
(``--steps``; where a run has no interleaved steps, the rounds' paired ratios are used and the table says so).
This script takes those ratios from each run's JSON and lays them out by prompt length: ``OUT.md`` (per side, per
length: speed over HF | over dense, the source run), ``OUT.json`` and ``OUT.png`` (two panels, one line per recipe
and runtime). A length measured by several runs takes each side from the last file that has it (so an ORT-only run
at 8k adds its rows to another run's torch and compiled rows). A block the load check marked
busy is left out (``--allow-busy`` keeps it, labelled). Why not one run at every length: the 8k and 2k blocks take
an hour each with every runtime, so lengths are measured in separate quiet windows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def side_ratios(block: dict, side: str, ort_spin: str = "off") -> dict | None:
    """{"vs_hf", "vs_dense", "ms", "source"} for one side of one prompt block, from its interleaved steps when it
    has them (``ms`` = median ms per step), else from the rounds' paired ratios (``ms`` None). ONNX Runtime sides of
    a run with ``--ort-spin on`` (its default before session 17) take the rounds: ORT's spinning threads slowed the
    side stepped after them, so their interleaved ratios are not comparable (``bench_decode.py --ort-spin``)."""
    step = (block.get("steps") or {}).get(side)
    if step and "vs_hf" in step and not (side.endswith("/onnx") and ort_spin == "on"):
        return {"vs_hf": step["vs_hf"], "vs_dense": step.get("vs_dense"), "ms": step["ms"], "source": "steps"}
    r = (block.get("ratios") or {}).get(side)
    if r is None:
        return None
    return {"vs_hf": r["decode_vs_hf"], "vs_dense": r.get("decode_vs_dense_same_runtime"), "ms": None, "source": "rounds"}


def collect(paths: list[Path], allow_busy: bool = False) -> dict:
    """{prompt: {"run": file name, "busy": bool, "kv": {side: kv fraction}, "sides": {side: side_ratios}}}."""
    out: dict = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        spin = result.get("ort_spin", "on")  # runs before the option spun (ORT's default)
        for P, block in result["prompts"].items():
            busy = bool(block["load"]["busy"])
            if busy and not allow_busy:
                continue
            sides = {}
            for side in block["median"]:
                if side == "original/hf":
                    continue
                r = side_ratios(block, side, spin)
                if r is not None:
                    sides[side] = r
            kv = {s: block["ratios"][s]["kv_fraction_of_hf"] for s in sides if s in block.get("ratios", {})}
            figs = block_figures(block)
            why = [f"{rt}: other processes {100 * ld['foreign_share']:.1f}%, load average {ld['load_before'][0]:.2f} before"
                   for rt, ld in block.get("blocks_load", {}).items() if ld.get("busy")]
            prev = out.get(int(P))
            if prev is not None:  # an earlier run at this length: its sides stay unless this run measured them too
                sides, kv, figs = {**prev["sides"], **sides}, {**prev["kv"], **kv}, {**prev["figures"], **figs}
                why = prev["busy_blocks"] + why
                busy, runs = busy or prev["busy"], f"{prev['run']}, {Path(path).name}"
                recipes = {**prev["recipes"], **block.get("recipes", {})}
            else:
                runs, recipes = Path(path).name, block.get("recipes", {})
            out[int(P)] = {"run": runs, "busy": busy, "busy_blocks": why, "sides": sides, "kv": kv, "recipes": recipes,
                           "figures": figs}
    return dict(sorted(out.items()))


FIGURES = ("prefill_tokens_per_s", "decode_tokens_per_s", "kv_bytes", "peak_mem_bytes")


def block_figures(block: dict) -> dict:
    """{side: the run's medians (prefill and decode tokens/s, KV bytes held, peak RSS added)} for every measured side,
    HF once per runtime block as ``hf@RUNTIME`` (each block is its own process with its own HF run)."""
    def pick(med: dict) -> dict:
        return {m: med[m] for m in FIGURES if m in med}

    figs = {side: pick(med) for side, med in block.get("median", {}).items() if side != "original/hf"}
    hf = block.get("hf_by_runtime") or ({"": block["median"]["original/hf"]} if "original/hf" in block.get("median", {}) else {})
    figs.update({f"hf@{rt}" if rt else "hf": pick(med) for rt, med in hf.items()})
    return figs


def figures_markdown(table: dict) -> str:
    """One row per prompt length and side: the absolute figures beside the ratios (issue 17's table); MB = 10^6 bytes,
    as in ``bench_decode.py``'s tables."""
    lines = ["| prompt | side | prefill tok/s | decode tok/s | decode / HF | decode / dense | KV MB held | KV / HF | peak RSS +MB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for P, t in table.items():
        order = sorted(t["figures"], key=lambda s: (s.split("@")[-1].split("/")[-1], not s.startswith("hf"),
                                                    not s.startswith("identity/"), s))
        for side in order:
            f, r = t["figures"][side], t["sides"].get(side, {})
            hf = 1.0 if side.startswith("hf") else None  # HF is its own reference: 1.00 of itself
            lines.append(f"| {P} | {side} | {_cell(f.get('prefill_tokens_per_s'), '.0f')} | {_cell(f.get('decode_tokens_per_s'), '.1f')} | "
                         f"{_cell(r.get('vs_hf', hf), '.2f')} | {_cell(r.get('vs_dense'), '.2f')} | "
                         f"{_cell(f.get('kv_bytes'), '.1f', 1e6)} | {_cell(t['kv'].get(side, hf), '.2f')} | "
                         f"{_cell(f.get('peak_mem_bytes'), '.0f', 1e6)} |")
    return "\n".join(lines) + "\n"


def _cell(value, fmt: str, unit: float = 1.0) -> str:
    """``value / unit`` formatted, or an empty cell where the run did not measure it."""
    return "" if value is None else format(value / unit, fmt)


def markdown(table: dict) -> str:
    lengths = list(table)
    sides = sorted({s for t in table.values() for s in t["sides"]}, key=lambda s: (s.split("/")[1], s != f"identity/{s.split('/')[1]}", s))
    head = "| side | " + " | ".join(f"{P} tokens: / HF, / dense (KV)" for P in lengths) + " |"
    lines = ["Decode speed over HF's step and over dense on the same runtime, by prompt length (medians of per-step "
             "ratios, interleaved in one process; 'r' = the rounds' paired ratio where the run had no interleaved "
             "steps). Sources: " + "; ".join(f"{P}: `{t['run']}`" + (f" (BUSY-labelled: {'; '.join(t['busy_blocks']) or 'see the run'})"
                                                              if t["busy"] else "")
                                            for P, t in table.items()), "", head,
             "|---|" + "---:|" * len(lengths)]
    for side in sides:
        cells = []
        for P in lengths:
            r = table[P]["sides"].get(side)
            if r is None:
                cells.append("")
                continue
            dense = f"{r['vs_dense']:.2f}" if r["vs_dense"] is not None else "-"
            kv = table[P]["kv"].get(side)
            cells.append(f"{r['vs_hf']:.2f}, {dense}" + (f" ({kv:.2f})" if kv is not None else "")
                         + (" r" if r["source"] == "rounds" else ""))
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    styles = {"torch": "-", "compiled": "-.", "onnx": ":"}
    series: dict = {}
    for P, t in table.items():
        for side, r in t["sides"].items():
            series.setdefault(side, []).append((P, r["vs_hf"], r["vs_dense"]))
    recipes = sorted({side.split("/")[0] for side in series})
    colors = {r: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(recipes)}  # colour = recipe, line style = runtime
    for side, pts in sorted(series.items()):
        pts.sort()
        recipe, rt = side.split("/")
        kw = {"marker": "o", "linestyle": styles.get(rt, "-"), "color": colors[recipe], "label": side}
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        dense = [(p[0], p[2]) for p in pts if p[2] is not None]
        if dense and recipe != "identity":
            axes[1].plot(*zip(*dense), **kw)
    absolute: dict = {}  # decode tokens/s of the rounds, HF as the median of its runs in the blocks
    for P, t in table.items():
        hf = sorted(f["decode_tokens_per_s"] for s, f in t.get("figures", {}).items() if s.startswith("hf") and "decode_tokens_per_s" in f)
        if hf:
            absolute.setdefault("HF generate()", []).append((P, hf[len(hf) // 2]))
        for side, f in t.get("figures", {}).items():
            if not side.startswith("hf") and "decode_tokens_per_s" in f:
                absolute.setdefault(side, []).append((P, f["decode_tokens_per_s"]))
    for side, pts in sorted(absolute.items()):
        recipe, rt = side.split("/") if "/" in side else (side, "")
        kw = {"marker": "o", "linestyle": styles.get(rt, "-"), "color": colors.get(recipe, "k"), "label": side,
              "linewidth": 2.5 if rt == "" else 1.5}
        axes[2].plot(*zip(*sorted(pts)), **kw)
    for ax, what in zip(axes, ("speed over HF's decode step", "speed over dense, same runtime", "decode tokens/s (rounds; lengths from different runs and host states)")):
        ax.set_title(f"{what} (- torch, -. compiled, : ONNX Runtime)", fontsize=9)
        if ax is not axes[2]:
            ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    busy = any(t["busy"] for t in table.values())
    fig.suptitle("decode speed by prompt length (ratios inside each run)" + (" (BUSY rows: not a result)" if busy else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench_decode.py result JSON files (later files win a side at a length)")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--allow-busy", action="store_true", help="keep blocks the load check marked busy (labelled)")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_file()]
    if missing:
        raise SystemExit(f"no such result file(s): {', '.join(missing)} (bench_decode.py writes OUT.json)")
    table = collect(args.runs, args.allow_busy)
    if not table:
        raise SystemExit("no quiet prompt block in these runs (every block was marked busy; --allow-busy keeps them)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({str(k): v for k, v in table.items()}, indent=2))
    md = markdown(table) + "\nAbsolute figures (medians of the rounds; decode / HF and / dense as in the table above):\n\n" + figures_markdown(table)
    out.with_suffix(".md").write_text(md)
    plot(table, out.with_suffix(".png"))
    print(md)
    print(f"written {out}.json, {out}.md, {out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
