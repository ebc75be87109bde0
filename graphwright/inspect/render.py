"""``render(graph, path)``: a self-contained HTML (or SVG) picture of the step graph.

A step graph has hundreds of nodes per model; what a person wants first is the layer
structure (which layers a recipe changed, what each costs in KV bytes) and only then the
nodes. So each layer is a collapsed ``<details>`` box whose summary line shows its attention
variant and KV bytes per token, expanding to its nodes with graphwright's own ops highlighted.
The file has inline CSS/JS only: it opens offline, from a CI artifact or an e-mail.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

from .nodes import format_shapes, gw_meta, is_graphwright, layer_map, node_shapes, target_name, unwrap
from .report import build_report

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f6f7f9;color:#1d2433}
header{background:#1d2433;color:#fff;padding:16px 24px}
header h1{margin:0 0 8px;font-size:20px}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0}
dl.summary dt{color:#9fb3c8}dl.summary dd{margin:0}
main{padding:16px 24px}
.controls{margin:0 0 12px}
.controls button{font:inherit;padding:4px 10px;margin-right:6px;border:1px solid #b8c2cc;background:#fff;border-radius:4px;cursor:pointer}
details.box{background:#fff;border:1px solid #d3d9e0;border-left:6px solid var(--c,#8896a8);border-radius:6px;margin:0 0 8px}
details.box>summary{cursor:pointer;padding:8px 12px;display:flex;gap:16px;align-items:center;list-style:none}
details.box>summary::before{content:"\\25B6";font-size:10px;color:#8896a8}
details.box[open]>summary::before{content:"\\25BC"}
summary .name{font-weight:600;min-width:140px}
summary .variant{padding:1px 8px;border-radius:10px;background:var(--c,#8896a8);color:#fff;font-size:12px}
summary .kv{min-width:260px}
summary .bar{display:inline-block;width:120px;height:8px;background:#e3e8ee;border-radius:4px;overflow:hidden;vertical-align:middle}
summary .bar i{display:block;height:100%;background:#3b82f6}
summary .count{color:#66788a;font-size:12px}
table.nodes{border-collapse:collapse;width:100%;font:12px/1.35 ui-monospace,SFMono-Regular,Menlo,monospace}
table.nodes th,table.nodes td{text-align:left;padding:2px 12px;border-top:1px solid #eef1f4;vertical-align:top}
table.nodes th{color:#66788a;font-weight:600}
tr.gw td{background:#fff5d6;font-weight:600}
tr.gw td.target{color:#b45309}
"""

_JS = """
function setAll(open){document.querySelectorAll('details.box').forEach(function(d){d.open=open;});}
"""


def _color(variant) -> str:
    """A stable colour per variant so the same rewrite looks the same in every report."""
    if variant in (None, "", "dense"):
        return "#8896a8"
    hue = int(hashlib.md5(str(variant).encode()).hexdigest()[:4], 16) % 360
    return f"hsl({hue},65%,45%)"


def _groups(obj) -> list:
    """``[(key, nodes)]`` in graph order: model inputs, layer 0..N-1, model outputs."""
    layers = layer_map(obj)
    # A model-level node is an "output" when it depends on layer computation (final norm, head,
    # the output node); sources (parameters, placeholders) follow their users.
    after = {}
    for node, layer in layers.items():
        after[node] = layer is None and any((layers[i] is not None and i.all_input_nodes) or after[i] for i in node.all_input_nodes)
    for node in reversed(list(layers)):
        if layers[node] is None and not node.all_input_nodes and node.users:
            after[node] = all(layers[u] is None and after[u] for u in node.users)
    pre, post, by_layer = [], [], {}
    for node, layer in layers.items():
        if layer is None:
            (post if after[node] else pre).append(node)
        else:
            by_layer.setdefault(layer, []).append(node)
    out = [("inputs", pre)] if pre else []
    out += [(layer, by_layer[layer]) for layer in sorted(by_layer)]
    out += [("outputs", post)] if post else []
    return out


def _layer_facts(obj) -> tuple[dict, dict]:
    """(summary, {layer: report row}) when the graph has a state layout; else node counts only."""
    gm, sg = unwrap(obj)
    if sg is not None:
        report = build_report(obj if hasattr(obj, "step_graph") else sg)
        return report.summary, {r["layer"]: r for r in report.rows}
    variants = {}
    for n in gm.graph.nodes:
        meta = gw_meta(n)
        if meta.get("op") == "attention":
            variants[meta.get("layer")] = {"attention": meta.get("variant")}
    return {"node_counts": {"total": len(gm.graph.nodes)}}, variants


def _node_rows(nodes) -> str:
    rows = []
    for n in nodes:
        cls = ' class="gw"' if is_graphwright(n) else ""
        variant = gw_meta(n).get("variant")
        extra = f" [{html.escape(str(variant))}]" if variant else ""
        rows.append(f"<tr{cls}><td>{html.escape(n.name)}</td><td>{html.escape(n.op)}</td>"
                    f'<td class="target">{html.escape(target_name(n))}{extra}</td>'
                    f"<td>{html.escape(format_shapes(node_shapes(n)))}</td></tr>")
    return "\n".join(rows)


def _box(key, nodes, row) -> str:
    gw_count = sum(is_graphwright(n) for n in nodes)
    if isinstance(key, int):
        variant = (row or {}).get("attention") or "?"
        kv, ratio = (row or {}).get("kv_bytes_per_token"), (row or {}).get("kv_ratio")
        kv_text = f"KV {kv:,} B/token ({ratio:.3f}× dense)" if kv is not None and ratio is not None else "KV n/a"
        bar = f'<span class="bar"><i style="width:{min(100.0, 100 * (ratio or 0)):.1f}%"></i></span>'
        moe = (row or {}).get("moe")
        moe_html = f'<span class="variant">{html.escape("moe: " + str(moe))}</span>' if moe else ""
        head = (f'<span class="name">Layer {key}</span><span class="variant">{html.escape(str(variant))}</span>{moe_html}'
                f'<span class="kv">{kv_text} {bar}</span>')
        attrs = f'class="box layer" id="layer-{key}" data-layer="{key}" data-variant="{html.escape(str(variant))}"'
        color = _color(variant)
    else:
        head = f'<span class="name">Model {key}</span>'
        attrs = f'class="box model" id="model-{key}"'
        color = "#4b5563"
    return (f'<details {attrs} style="--c:{color}"><summary>{head}'
            f'<span class="count">{len(nodes)} nodes, {gw_count} graphwright</span></summary>\n'
            f'<table class="nodes"><thead><tr><th>node</th><th>op</th><th>target</th><th>shapes</th></tr></thead>'
            f"<tbody>\n{_node_rows(nodes)}\n</tbody></table></details>")


def _summary_html(summary: dict) -> tuple[str, str]:
    title = summary.get("architecture", "step graph")
    items = []
    if "num_layers" in summary:
        items.append(("Model", f"{summary['architecture']} ({summary['model_type']}), {summary['num_layers']} layers, "
                               f"{summary['num_heads']} heads / {summary['num_kv_heads']} KV heads x {summary['head_dim']}, "
                               f"{summary['dtype']}"))
        items.append(("Recipe", summary["recipe"]))
        items.append(("KV bytes/token", f"{summary['kv_bytes_per_token']:,} of {summary['dense_kv_bytes_per_token']:,} "
                                        f"dense (ratio {summary['kv_ratio']:.3f})"))
    items.append(("Nodes", ", ".join(f"{k} {v}" for k, v in summary["node_counts"].items())))
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items)
    return title, dl


def to_html(graph) -> str:
    """The HTML document as a string (``render`` writes it)."""
    summary, rows = _layer_facts(graph)
    title, dl = _summary_html(summary)
    boxes = "\n".join(_box(key, nodes, rows.get(key) if isinstance(key, int) else None) for key, nodes in _groups(graph))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>graphwright: {html.escape(title)}</title>'
            f"<style>{_CSS}</style><script>{_JS}</script></head>\n<body>\n"
            f'<header><h1>graphwright · {html.escape(title)}</h1><dl class="summary">{dl}</dl></header>\n'
            f'<main><div class="controls"><button onclick="setAll(true)">expand all</button>'
            f'<button onclick="setAll(false)">collapse all</button></div>\n{boxes}\n</main>\n</body></html>\n')


def to_svg(graph) -> str:
    """A static overview: one bar per layer coloured by variant, length = KV bytes vs dense."""
    summary, rows = _layer_facts(graph)
    layers = sorted(k for k, _ in _groups(graph) if isinstance(k, int))
    w, h, top = 720, 26, 48
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{top + h * len(layers) + 12}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="12" y="22" font-size="15" font-weight="bold">graphwright · {html.escape(summary.get("architecture", ""))} '
             f'({html.escape(summary.get("recipe", ""))})</text>']
    for i, layer in enumerate(layers):
        row = rows.get(layer) or {}
        variant, ratio = row.get("attention") or "?", row.get("kv_ratio")
        y = top + i * h
        bw = 300 * min(1.0, ratio if ratio is not None else 0.0)
        parts.append(f'<text x="12" y="{y + 15}">layer {layer}</text>'
                     f'<rect x="80" y="{y + 4}" width="300" height="14" fill="#e3e8ee"/>'
                     f'<rect x="80" y="{y + 4}" width="{bw:.1f}" height="14" fill="{_color(variant)}"/>'
                     f'<text x="392" y="{y + 15}">{html.escape(str(variant))}'
                     f'{"" if ratio is None else f" · {ratio:.3f}× dense KV"}</text>')
    parts.append("</svg>\n")
    return "\n".join(parts)


def render(graph, path) -> Path:
    """Write ``graph`` (CompiledModel, StepGraph or GraphModule) to ``path``: ``.svg`` gives the
    static per-layer overview, anything else the interactive HTML page. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_svg(graph) if path.suffix.lower() == ".svg" else to_html(graph)
    path.write_text(text, encoding="utf-8")
    return path
