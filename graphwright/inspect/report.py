"""``cm.report()``: one row per layer saying what the recipe made of it.

The report is the user's answer to "what did this recipe do to my model?": per layer the
attention variant, the KV bytes a token costs against a dense cache, the MoE variant and each
pass's decisions (read from ``sg.notes[pass]["per_layer"]``, the contract in ``passes/base.py``);
plus a summary with the recipe, totals, verification and the last generation's stats.
It is plain data first (``to_dict``) and a rich table second (``print(report)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..capture.step_graph import element_size, spec_bytes_per_token
from .nodes import gw_meta, unwrap
from .plain import plain_text

BASE_COLUMNS = (
    ("layer", "Layer"),
    ("module", "Module"),
    ("attention", "Attention"),
    ("kv_bytes_per_token", "KV B/tok"),
    ("dense_kv_bytes_per_token", "Dense B/tok"),
    ("kv_ratio", "Ratio"),
    ("moe", "MoE"),
)
_HIDDEN_IN_PASS_COLUMN = ("kv_bytes_per_token",)  # already its own column


def jsonable(x):
    """Plain JSON data (str keys, lists, finite numbers) from notes, stats and verification dicts."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist()) if x.numel() <= 64 else f"tensor{list(x.shape)}"
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        try:
            return jsonable(x.item())
        except (TypeError, ValueError):
            pass
    return str(x)


def compact(value, max_items: int = 4) -> str:
    """A pass's per-layer decisions as one short cell: ``{"r_k": 96, "r_v": 80}`` -> ``r_k=96 r_v=80``."""
    if isinstance(value, dict):
        return " ".join(f"{k}={compact(v, max_items)}" for k, v in value.items() if k not in _HIDDEN_IN_PASS_COLUMN)
    if isinstance(value, (list, tuple)):
        items = [compact(v, max_items) for v in value[:max_items]]
        more = f",…({len(value)})" if len(value) > max_items else ""
        return "[" + ",".join(items) + more + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _per_layer(note: dict, layer: int):
    per = note.get("per_layer") or {}
    return per.get(layer, per.get(str(layer)))


def _verification_line(p: dict) -> str:
    """'noop: exact, max |dlogit| 0' / 'lowrank_kv: lossy, max |dlogit| 0.41, KL 0.0021' on the probe."""
    diff, kl = p.get("max_abs_logit_diff"), p.get("kl")
    line = f"{p.get('name')}: {'exact' if p.get('exact') else 'lossy'}"
    if diff is not None:
        line += f", max |dlogit| {diff:.3g}"
    if kl is not None and not p.get("exact"):
        line += f", KL {kl:.3g}"
    return line


@dataclass
class Report:
    """Per-layer rows plus a model summary; ``to_dict()`` for JSON, ``print(report)`` for people."""

    summary: dict
    rows: list  # list[dict], one per layer, keyed by the column keys
    columns: list  # list[(key, header)]
    extra: dict = field(default_factory=dict)  # verification, last_stats

    def to_dict(self) -> dict:
        return jsonable({"summary": self.summary, "columns": [k for k, _ in self.columns], "rows": self.rows, **self.extra})

    # ----- rendering -----------------------------------------------------------------------
    def _cell(self, key, value) -> str:
        if value is None:
            return "-"
        if key == "kv_ratio":
            return f"{value:.3f}"
        if key in ("kv_bytes_per_token", "dense_kv_bytes_per_token"):
            return f"{value:,}"
        return str(value)

    def summary_table(self) -> Table:
        s = self.summary
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("Model", f"{s['architecture']} ({s['model_type']}), {s['num_layers']} layers, "
                              f"{s['num_heads']} heads / {s['num_kv_heads']} KV heads x {s['head_dim']}, {s['dtype']}")
        grid.add_row("Recipe", s["recipe"] + (f"  [backend {s['backend']}]" if s.get("backend") else ""))
        grid.add_row("KV bytes/token", f"{s['kv_bytes_per_token']:,} of {s['dense_kv_bytes_per_token']:,} dense "
                                       f"(ratio {s['kv_ratio']:.3f})")
        grid.add_row("Nodes", compact(s["node_counts"], max_items=16))
        order = self.extra.get("pass_order") or {}
        if order.get("order"):
            why = "; ".join(order.get("constraints") or []) or "no constraints between them: stage, then name"
            changed = "" if order["order"] == order.get("written") else f" (written: {' + '.join(order['written'])})"
            grid.add_row("Pass order", Text(f"{' -> '.join(order['order'])}{changed}. Why: {why}"))
        passes = (self.extra.get("verification") or {}).get("passes") or []
        if passes:
            grid.add_row("Verification", Text("; ".join(_verification_line(p) for p in passes)))
        if self.extra.get("last_stats"):
            grid.add_row("Last run", Text(compact(self.extra["last_stats"])))
        return grid

    def table(self) -> Table:
        t = Table(box=box.SIMPLE_HEAD, show_footer=True)
        total = {"layer": "total", "kv_bytes_per_token": self.summary["kv_bytes_per_token"],
                 "dense_kv_bytes_per_token": self.summary["dense_kv_bytes_per_token"], "kv_ratio": self.summary["kv_ratio"]}
        for key, header in self.columns:
            numeric = key in ("layer", "kv_bytes_per_token", "dense_kv_bytes_per_token", "kv_ratio")
            footer = self._cell(key, total[key]) if key in total else ""
            t.add_column(header, footer=footer, justify="right" if numeric else "left",
                         overflow="fold", no_wrap=key == "module")
        for row in self.rows:
            cells = [self._cell(k, row.get(k)) for k, _ in self.columns]
            style = "" if row.get("attention") in (None, "dense") else "cyan"
            t.add_row(*cells, style=style)
        return t

    def __rich_console__(self, console, options):
        yield Group(Text("graphwright report", style="bold underline"), self.summary_table(), self.table())

    def __str__(self) -> str:
        return plain_text(self)

    __repr__ = __str__


def build_report(cm) -> Report:
    """Build the per-layer report of a ``CompiledModel`` (or a bare ``StepGraph``)."""
    gm, sg = unwrap(cm)
    if sg is None:
        raise TypeError("build_report needs a CompiledModel or StepGraph (a bare GraphModule has no state layout)")
    info = sg.info
    dense_layer = 2 * info.num_kv_heads * info.head_dim * element_size(info.dtype)

    attn, moe = {}, {}
    counts: dict = {"total": 0}
    for node in gm.graph.nodes:
        counts["total"] += 1
        counts[node.op] = counts.get(node.op, 0) + 1
        meta = gw_meta(node)
        if meta.get("op"):
            counts[meta["op"]] = counts.get(meta["op"], 0) + 1
            if meta["op"] == "attention":
                attn[meta.get("layer")] = meta
            elif meta["op"].startswith("moe"):
                moe[meta.get("layer")] = meta

    state_bytes: dict = {}
    for spec in sg.state:
        if spec.kind == "kv" and spec.layer is not None:
            state_bytes[spec.layer] = state_bytes.get(spec.layer, 0) + spec_bytes_per_token(spec)

    pass_notes = [(name, note) for name, note in sg.notes.items() if isinstance(note, dict) and isinstance(note.get("per_layer"), dict)]
    columns = [c for c in BASE_COLUMNS if c[0] != "moe" or moe or info.is_moe] + [(name, name) for name, _ in pass_notes]

    rows = []
    for layer in range(info.num_layers):
        kv = state_bytes.get(layer, 0)
        for _, note in pass_notes:  # a pass that knows better (per-head budgets, latents) wins; the last one is current
            decided = _per_layer(note, layer)
            if isinstance(decided, dict) and decided.get("kv_bytes_per_token") is not None:
                kv = decided["kv_bytes_per_token"]
        a = attn.get(layer, {})
        module = a.get("module") or (info.attention_modules[layer] if layer < len(info.attention_modules) else "")
        row = {
            "layer": layer,
            "module": module,
            "attention": a.get("variant"),
            "kv_bytes_per_token": kv,
            "dense_kv_bytes_per_token": dense_layer,
            "kv_ratio": kv / dense_layer if dense_layer else None,
            "moe": moe[layer].get("variant") if layer in moe else None,
        }
        for name, note in pass_notes:
            decided = _per_layer(note, layer)
            show = note.get("show")  # a pass may name the per-layer keys worth a terminal column
            if isinstance(decided, dict) and show:
                decided = {k: decided[k] for k in show if k in decided}
            row[name] = None if decided is None else (compact(decided) or "-")
        rows.append(row)

    total = sum(r["kv_bytes_per_token"] for r in rows)
    dense_total = dense_layer * info.num_layers
    recipe = getattr(cm, "recipe", None)
    summary = {
        "architecture": info.architecture,
        "model_type": info.model_type,
        "num_layers": info.num_layers,
        "num_heads": info.num_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "dtype": str(info.dtype).replace("torch.", ""),
        "is_moe": info.is_moe,
        "recipe": str(recipe) if recipe is not None and str(recipe) else "identity",
        "backend": getattr(cm, "backend", None),
        "kv_bytes_per_token": total,
        "dense_kv_bytes_per_token": dense_total,
        "kv_ratio": total / dense_total if dense_total else None,
        "node_counts": counts,
        "passes": [name for name, _ in pass_notes],
    }
    extra = {"verification": dict(getattr(cm, "verification", None) or {}),
             "last_stats": dict(getattr(cm, "last_stats", None) or {}),
             "pass_order": dict(sg.notes.get("pass_order") or {}),  # the pass manager's order and its reasons
             "notes": {name: note for name, note in pass_notes}}  # every decision in full, for .to_dict()
    return Report(summary=summary, rows=rows, columns=columns, extra=extra)
